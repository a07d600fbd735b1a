'use strict';
'require view';
'require poll';
'require rpc';
'require ui';

// Everything on this page comes from one call, `ubus call gwsync status`,
// repeated by LuCI's poller: no state of its own to go stale.
var callStatus = rpc.declare({
	object: 'gwsync',
	method: 'status',
	expect: { '': {} }
});

// Counters that stay at zero on a healthy LAN; any other value is worth a
// look. Drop reasons are listed apart (counters.dropped), except `own`: a
// gateway hears its own multicast, that is normal.
var ATTENTION_COUNTERS = {
	recv_errors: _('Receive errors'),
	recv_truncated: _('Datagrams larger than the receive buffer'),
	send_errors: _('Send errors'),
	send_no_buffers: _('Sends without socket buffers'),
	socket_open_errors: _('Socket open errors'),
	join_errors: _('Multicast join errors'),
	state_write_errors: _('State file write errors'),
	changes_dropped: _('Change events dropped'),
	key_reload_errors: _('Key file reload errors'),
	node_id_clashes: _('Node id clashes (cloned image?)')
};

function formatAgo(ms) {
	if (ms == null || isNaN(ms))
		return '-';
	var s = Math.floor(ms / 1000);

	if (s < 1)
		return _('just now');
	if (s < 60)
		return _('%d s ago').format(s);
	if (s < 3600)
		return _('%d min %d s ago').format(Math.floor(s / 60), s % 60);
	return _('%s ago').format('%t'.format(s));
}

function keyState(st) {
	var state = st.key_state || (st.keyed ? 'keyed' : 'open'),
	    other = st.other_key || {},
	    parts = [];

	if (state == 'keyed')
		parts.push(E('span', { 'class': 'label success' }, _('Keyed')),
			' ', _('datagrams are encrypted and authenticated'));
	else
		parts.push(E('span', { 'class': 'label warning' }, _('Open')),
			' ', _('no group key: datagrams are sent in clear text and not authenticated'));

	if (other.senders > 0)
		parts.push(E('br'), E('span', { 'class': 'label warning' }, _('Hearing another key')), ' ',
			_('%d sender(s), %d datagram(s) no configured key opens: %s').format(
				other.senders, other.datagrams || 0, (other.addresses || []).join(', ') || '?'));

	return E('span', { 'id': 'gwsync-key-state', 'data-state': (other.senders > 0) ? 'other' : state }, parts);
}

function attentionRows(st) {
	var c = st.counters || {},
	    rows = [];

	Object.keys(c.dropped || {}).sort().forEach(function(reason) {
		if (reason != 'own' && c.dropped[reason] > 0)
			rows.push([ _('Datagrams dropped: %s').format(reason), c.dropped[reason] ]);
	});

	Object.keys(ATTENTION_COUNTERS).forEach(function(name) {
		if (c[name] > 0)
			rows.push([ ATTENTION_COUNTERS[name], c[name] ]);
	});

	if (st.persist && !st.persist.ok)
		rows.push([ _('State not saved'), st.persist.error || _('unknown error') ]);

	return rows;
}

return view.extend({
	load: function() {
		return L.resolveDefault(callStatus(), null);
	},

	overviewRows: function(st) {
		var ifaces = (st.interfaces || []).map(function(i) {
			return i.name + (i.joined ? '' : ' (%s)'.format(_('not joined')));
		});

		return [
			[ _('Node id'), E('code', { 'id': 'gwsync-node-id' }, st.node_id || '?') ],
			[ _('Key state'), keyState(st) ],
			[ _('Entries'), this.usage(st) ],
			[ _('Summary digest'), E('code', {}, st.digest || '-') ],
			[ _('Multicast group'), '%s port %d'.format(st.group || '?', st.port || 0) ],
			[ _('Interfaces'), ifaces.join(', ') || '-' ],
			[ _('Datagrams sent / received'), '%d / %d'.format(
				(st.counters || {}).datagrams_sent || 0, (st.counters || {}).datagrams_received || 0) ],
			[ _('Up for'), '%t'.format(Math.floor((st.uptime_ms || 0) / 1000)) ],
			[ _('Version'), st.version || '?' ]
		];
	},

	// Entries and bytes against the limits, when the daemon reports them:
	// a store near its cap refuses writes.
	usage: function(st) {
		var limits = st.limits || {},
		    text = _('%d keys, %d deleted (remembered), %1024mB').format(st.live_entries || 0,
			(st.entries || 0) - (st.live_entries || 0), st.store_bytes || 0);

		if (limits.max_entries && limits.max_store_bytes)
			text += ' \u2014 ' + _('limits %d entries, %1024mB').format(limits.max_entries, limits.max_store_bytes);

		var full = (limits.max_entries && st.entries >= 0.9 * limits.max_entries) ||
			(limits.max_store_bytes && st.store_bytes >= 0.9 * limits.max_store_bytes);

		return full ? E('span', {}, [ E('span', { 'class': 'label warning' }, _('Nearly full')), ' ', text ]) : text;
	},

	peerRows: function(st) {
		return (st.peers || []).map(function(p) {
			var agrees = p.in_sync
				? E('span', { 'class': 'label success' }, _('in sync'))
				: (p.in_sync === false
					? E('span', { 'class': 'label notice' }, _('differs'))
					: '?');

			return [
				E('code', {}, p.node_id),
				[ p.last_heard_ms_ago, formatAgo(p.last_heard_ms_ago) ],
				agrees,
				E('code', {}, p.digest || '-')
			];
		});
	},

	changeRows: function(st) {
		var changes = st.recent_changes || (st.last_change ? [ st.last_change ] : []);

		return changes.map(function(ch) {
			return [
				E('code', { 'class': 'gwsync-change' }, ch.key),
				ch.deleted ? E('em', {}, _('deleted')) : _('set'),
				(ch.origin && ch.origin == st.node_id)
					? E('span', {}, [ E('code', {}, ch.origin), ' ', E('em', {}, _('(this gateway)')) ])
					: E('code', {}, ch.origin || '?'),
				[ ch.ms_ago, formatAgo(ch.ms_ago) ]
			];
		});
	},

	update: function(st) {
		// Without the daemon the tables would only show stale values.
		this.missing.style.display = st ? 'none' : '';
		this.sections.style.display = st ? '' : 'none';

		if (!st)
			return;

		this.overview.update(this.overviewRows(st));
		this.peers.update(this.peerRows(st), _('No other gateway heard yet'));
		this.changes.update(this.changeRows(st), _('No changes since the daemon started'));
		this.attention.update(attentionRows(st), _('Nothing to report: no drops or errors'));
	},

	render: function(st) {
		this.overview = new ui.Table([ _('Gateway'), '' ], { id: 'gwsync-overview', sortable: false, classes: 'gwsync-overview' });
		this.peers = new ui.Table([ _('Node id'), _('Last heard'), _('Agrees with us'), _('Digest') ],
			{ id: 'gwsync-peers', sortable: false }, E('em', {}, _('No other gateway heard yet')));
		this.changes = new ui.Table([ _('Key'), _('Change'), _('Origin'), _('When') ],
			{ id: 'gwsync-changes', sortable: false }, E('em', {}, _('No changes since the daemon started')));
		this.attention = new ui.Table([ _('Counter'), _('Value') ],
			{ id: 'gwsync-attention', sortable: false }, E('em', {}, _('Nothing to report')));

		var page = E('div', { 'class': 'cbi-map' }, [
			E('h2', {}, _('Gateway sync: status')),
			E('div', { 'class': 'cbi-map-descr' },
				_('This gateway keeps one shared data set identical with every other gateway on the LAN that uses the same multicast group and key.')),
			this.missing = E('div', { 'id': 'gwsync-missing', 'class': 'alert-message warning' },
				_('The gwsync daemon does not answer on ubus: it is stopped, disabled or has no usable network. See Settings and the system log.')),
			this.sections = E('div', { 'id': 'gwsync-sections' }, [
				E('div', { 'class': 'cbi-section' }, [ this.overview.node ]),
				E('div', { 'class': 'cbi-section' }, [
					E('h3', {}, _('Gateways heard')),
					E('div', { 'class': 'cbi-section-descr' },
						_('While nothing changes, gateways in sync take turns to speak and may stay quiet for minutes; a change is sent at once.')),
					this.peers.node
				]),
				E('div', { 'class': 'cbi-section' }, [ E('h3', {}, _('Recent changes')), this.changes.node ]),
				E('div', { 'class': 'cbi-section' }, [ E('h3', {}, _('Drops and errors')), this.attention.node ])
			])
		]);

		this.update(st);

		poll.add(L.bind(function() {
			return L.resolveDefault(callStatus(), null).then(L.bind(this.update, this));
		}, this), 2);

		return page;
	},

	handleSaveApply: null,
	handleSave: null,
	handleReset: null
});
