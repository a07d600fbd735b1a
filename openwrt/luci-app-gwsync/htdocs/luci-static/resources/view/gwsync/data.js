'use strict';
'require view';
'require poll';
'require rpc';
'require ui';

// Keys a page shows; the daemon pages with list's offset/limit, so a store
// of any size costs one page of keys (and one get per shown key) per refresh.
var PAGE_SIZE = 25;
// Characters of a value shown in the table; the whole value is one click away.
var PREVIEW_CHARS = 96;

var callList = rpc.declare({
	object: 'gwsync',
	method: 'list',
	params: [ 'prefix', 'offset', 'limit' ],
	expect: { '': {} }
});

var callGet = rpc.declare({
	object: 'gwsync',
	method: 'get',
	params: [ 'key' ],
	expect: { '': {} }
});

var callSet = rpc.declare({
	object: 'gwsync',
	method: 'set',
	params: [ 'key', 'value' ]
});

var callDel = rpc.declare({
	object: 'gwsync',
	method: 'del',
	params: [ 'key' ]
});

var callSessionAccess = rpc.declare({
	object: 'session',
	method: 'access',
	params: [ 'scope', 'object', 'function' ],
	expect: { 'access': false }
});

function pretty(value) {
	return JSON.stringify(value, null, 2);
}

function preview(value) {
	var text = JSON.stringify(value);

	if (text == null)
		return '';
	return (text.length > PREVIEW_CHARS) ? text.substr(0, PREVIEW_CHARS - 1) + '\u2026' : text;
}

// rpc.js rejects with an Error whose message names the ubus status.
function describeError(err) {
	// The first line: rpc.js appends a stack trace.
	var msg = ((err && err.message) ? err.message : String(err)).split('\n')[0];

	if (/PERMISSION_DENIED|Access denied/i.test(msg))
		return _('Permission denied: this login may only read.');
	if (/INVALID_ARGUMENT/i.test(msg))
		return _('Rejected by the daemon: bad key or value, or too large.');
	if (/NOT_FOUND/i.test(msg))
		return _('No such key (deleted meanwhile?).');
	if (/Object not found/i.test(msg))
		return _('The gwsync daemon does not answer on ubus: it is stopped, disabled or has no usable network.');
	if (/UNKNOWN_ERROR/i.test(msg))
		return _('The daemon could not store it (store full or I/O error).');
	return msg;
}

return view.extend({
	load: function() {
		return Promise.all([
			L.resolveDefault(callSessionAccess('ubus', 'gwsync', 'set'), false),
			L.resolveDefault(callSessionAccess('ubus', 'gwsync', 'del'), false)
		]);
	},

	// Fetches the current page: keys from list, then each shown key's value
	// (rpc.js sends the gets as one batched request).
	fetchPage: function() {
		var prefix = this.prefix, offset = this.offset;

		return callList(prefix, offset, PAGE_SIZE).then(function(res) {
			var keys = Array.isArray(res.keys) ? res.keys : [];

			return Promise.all(keys.map(function(key) {
				return L.resolveDefault(callGet(key), null);
			})).then(function(entries) {
				return { keys: keys, total: res.total || 0, entries: entries, prefix: prefix, offset: offset };
			});
		});
	},

	refresh: function() {
		return this.fetchPage().then(L.bind(this.showPage, this), L.bind(function(err) {
			this.showError(_('Cannot list the keys: %s').format(describeError(err)));
		}, this));
	},

	showError: function(text) {
		this.errorBox.textContent = text || '';
		this.errorBox.style.display = text ? '' : 'none';
	},

	showPage: function(page) {
		// A filter typed or a page turned while this request ran wins.
		if (page.prefix !== this.prefix || page.offset !== this.offset)
			return;

		// Deleting the last key of the last page: go back one page.
		if (page.keys.length == 0 && page.offset > 0 && page.total > 0) {
			this.offset = Math.max(0, Math.floor((page.total - 1) / PAGE_SIZE) * PAGE_SIZE);
			return this.refresh();
		}

		this.showError(null);
		this.page = page;

		var rows = page.keys.map(L.bind(function(key, i) {
			var entry = page.entries[i];

			return [
				E('code', { 'class': 'gwsync-key' }, key),
				E('code', { 'class': 'gwsync-value' }, entry ? preview(entry.value) : E('em', {}, _('(gone)'))),
				E('code', {}, entry ? (entry.origin || '?') : '-'),
				E('div', { 'class': 'cbi-section-actions', 'style': 'white-space:nowrap' }, [
					E('button', {
						'class': 'btn cbi-button cbi-button-neutral gwsync-view',
						'data-key': key,
						'click': ui.createHandlerFn(this, 'handleView', key)
					}, _('View')),
					' ',
					E('button', {
						'class': 'btn cbi-button cbi-button-edit gwsync-edit',
						'data-key': key,
						'disabled': this.canSet ? null : true,
						'title': this.canSet ? null : _('This login may only read'),
						'click': ui.createHandlerFn(this, 'handleEdit', key)
					}, _('Edit')),
					' ',
					E('button', {
						'class': 'btn cbi-button cbi-button-remove gwsync-delete',
						'data-key': key,
						'disabled': this.canDel ? null : true,
						'title': this.canDel ? null : _('This login may only read'),
						'click': ui.createHandlerFn(this, 'handleDelete', key)
					}, _('Delete'))
				])
			];
		}, this));

		this.table.update(rows, page.prefix
			? _('No key starts with "%s"').format(page.prefix)
			: _('The data set is empty'));

		var last = Math.min(page.offset + page.keys.length, page.total);
		this.rangeText.textContent = page.total
			? _('Keys %d\u2013%d of %d').format(page.keys.length ? page.offset + 1 : 0, last, page.total)
			: _('No keys');
		this.prevButton.disabled = page.offset == 0;
		this.nextButton.disabled = last >= page.total;
	},

	handleFilter: function(ev) {
		this.prefix = this.prefixInput.value;
		this.offset = 0;
		return this.refresh();
	},

	handlePage: function(step, ev) {
		this.offset = Math.max(0, this.offset + step * PAGE_SIZE);
		return this.refresh();
	},

	handleView: function(key, ev) {
		return callGet(key).then(function(entry) {
			ui.showModal(_('Key %s').format(key), [
				E('pre', { 'id': 'gwsync-view-value', 'style': 'max-height:60vh;overflow:auto;white-space:pre-wrap' }, pretty(entry.value)),
				E('p', {}, _('Version %s, written by %s').format(entry.version != null ? entry.version : '?', entry.origin || '?')),
				E('div', { 'class': 'right' }, [
					E('button', { 'class': 'btn cbi-button', 'click': ui.hideModal }, _('Close'))
				])
			]);
		}, function(err) {
			ui.addNotification(null, E('p', {}, describeError(err)), 'error');
		});
	},

	// One modal for add (key == null) and edit. The value is parsed in the
	// browser first: invalid JSON never reaches the daemon.
	showEditor: function(key, value) {
		var keyInput = E('input', {
			'id': 'gwsync-edit-key', 'class': 'cbi-input-text', 'type': 'text',
			'style': 'width:100%', 'placeholder': 'home/1/scene/evening',
			'value': key || '', 'readonly': (key != null) ? true : null
		});
		var textarea = E('textarea', {
			'id': 'gwsync-edit-value', 'class': 'cbi-input-textarea', 'rows': 14,
			'style': 'width:100%;font-family:monospace', 'spellcheck': 'false'
		}, (value !== undefined) ? pretty(value) : '');
		var message = E('div', { 'id': 'gwsync-edit-error', 'class': 'cbi-value-error', 'style': 'color:#c00;min-height:1.5em' });

		var check = function() {
			try {
				JSON.parse(textarea.value);
				message.textContent = '';
				textarea.classList.remove('cbi-input-invalid');
				return true;
			} catch (e) {
				message.textContent = _('Not valid JSON: %s').format(e.message);
				textarea.classList.add('cbi-input-invalid');
				return false;
			}
		};
		textarea.addEventListener('input', check);

		var save = L.bind(function(ev) {
			var k = keyInput.value.trim(), parsed;

			if (k == '') {
				message.textContent = _('The key may not be empty.');
				return;
			}
			if (!check())
				return;
			parsed = JSON.parse(textarea.value);

			return callSet(k, parsed).then(L.bind(function() {
				ui.hideModal();
				ui.addNotification(null, E('p', {}, _('Saved %s; it is on its way to the other gateways.').format(k)), 'info');
				return this.refresh();
			}, this), function(err) {
				message.textContent = describeError(err);
			});
		}, this);

		ui.showModal(key != null ? _('Edit %s').format(key) : _('Add a key'), [
			E('label', { 'for': 'gwsync-edit-key', 'style': 'display:block;font-weight:bold' }, _('Key')), keyInput,
			E('label', { 'for': 'gwsync-edit-value', 'style': 'display:block;font-weight:bold;margin-top:.5em' }, _('Value (JSON)')), textarea,
			message,
			E('div', { 'class': 'right' }, [
				E('button', { 'class': 'btn cbi-button', 'click': ui.hideModal }, _('Cancel')),
				' ',
				E('button', { 'id': 'gwsync-edit-save', 'class': 'btn cbi-button cbi-button-positive', 'click': ui.createHandlerFn(this, save) }, _('Save'))
			])
		]);
		(key != null ? textarea : keyInput).focus();
	},

	handleAdd: function(ev) {
		if (!this.canSet)
			return;
		this.showEditor(null, undefined);
	},

	handleEdit: function(key, ev) {
		if (!this.canSet)
			return;
		return callGet(key).then(L.bind(function(entry) {
			this.showEditor(key, entry.value);
		}, this), function(err) {
			ui.addNotification(null, E('p', {}, describeError(err)), 'error');
		});
	},

	handleDelete: function(key, ev) {
		if (!this.canDel)
			return;
		ui.showModal(_('Delete %s?').format(key), [
			E('p', {}, _('The key is deleted on every gateway of the group.')),
			E('div', { 'class': 'right' }, [
				E('button', { 'class': 'btn cbi-button', 'click': ui.hideModal }, _('Cancel')),
				' ',
				E('button', {
					'id': 'gwsync-delete-confirm',
					'class': 'btn cbi-button cbi-button-negative',
					'click': ui.createHandlerFn(this, function() {
						return callDel(key).then(L.bind(function() {
							ui.hideModal();
							return this.refresh();
						}, this), function(err) {
							ui.hideModal();
							ui.addNotification(null, E('p', {}, describeError(err)), 'error');
						});
					})
				}, _('Delete'))
			])
		]);
	},

	render: function(access) {
		this.canSet = L.hasViewPermission() !== false && access[0] === true;
		this.canDel = L.hasViewPermission() !== false && access[1] === true;
		this.prefix = '';
		this.offset = 0;

		this.table = new ui.Table([ _('Key'), _('Value'), _('Origin'), '' ],
			{ id: 'gwsync-keys', sortable: false }, E('em', { 'class': 'spinning' }, _('Loading keys\u2026')));

		var prefix = this.prefixInput = E('input', {
			'id': 'gwsync-prefix', 'class': 'cbi-input-text', 'type': 'text',
			'placeholder': _('Key prefix, e.g. home/1/'),
			'keydown': L.bind(function(ev) { if (ev.key == 'Enter') this.handleFilter(ev); }, this)
		});

		var page = E('div', { 'class': 'cbi-map' }, [
			E('h2', {}, _('Gateway sync: data')),
			E('div', { 'class': 'cbi-map-descr' }, this.canSet
				? _('The shared data set. Every change made here reaches the other gateways of the group.')
				: _('The shared data set. This login may only read it.')),
			this.errorBox = E('div', { 'id': 'gwsync-data-error', 'class': 'alert-message warning', 'style': 'display:none' }),
			E('div', { 'class': 'cbi-section' }, [
				E('div', { 'style': 'display:flex;gap:.5em;align-items:center;flex-wrap:wrap;margin-bottom:1em' }, [
					prefix,
					E('button', { 'id': 'gwsync-filter', 'class': 'btn cbi-button cbi-button-apply', 'click': ui.createHandlerFn(this, 'handleFilter') }, _('Filter')),
					E('span', { 'style': 'flex:1' }),
					E('button', {
						'id': 'gwsync-add', 'class': 'btn cbi-button cbi-button-add',
						'disabled': this.canSet ? null : true,
						'title': this.canSet ? null : _('This login may only read'),
						'click': ui.createHandlerFn(this, 'handleAdd')
					}, _('Add key'))
				]),
				this.table.node,
				E('div', { 'style': 'display:flex;gap:.5em;align-items:center;margin-top:1em' }, [
					this.prevButton = E('button', { 'id': 'gwsync-prev', 'class': 'btn cbi-button', 'disabled': true, 'click': ui.createHandlerFn(this, 'handlePage', -1) }, _('\u2039 Previous')),
					this.rangeText = E('span', { 'id': 'gwsync-range' }, ''),
					this.nextButton = E('button', { 'id': 'gwsync-next', 'class': 'btn cbi-button', 'disabled': true, 'click': ui.createHandlerFn(this, 'handlePage', 1) }, _('Next \u203a'))
				])
			])
		]);

		// Live: keys written on other gateways show up without a reload.
		poll.add(L.bind(function() {
			// Not under an open editor: a refresh must not move the rows it edits.
			if (document.body.classList.contains('modal-overlay-active'))
				return Promise.resolve();
			return this.refresh();
		}, this), 5);

		return this.refresh().then(function() { return page; });
	},

	handleSaveApply: null,
	handleSave: null,
	handleReset: null
});
