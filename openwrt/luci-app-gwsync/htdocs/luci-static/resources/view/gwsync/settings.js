'use strict';
'require view';
'require form';
'require tools.widgets as widgets';

// Every option of `config gwsync 'main'` in /etc/config/gwsync. Save & Apply
// commits through rpcd's uci apply; the init script's reload trigger on
// config `gwsync` then restarts the daemon with the new command line.

// The datatype checks the syntax; this only the multicast ranges.
function isMulticast(addr) {
	var v4 = addr.match(/^(\d{1,3})\.\d{1,3}\.\d{1,3}\.\d{1,3}$/);

	if (v4)
		return +v4[1] >= 224 && +v4[1] <= 239;
	return /^ff[0-9a-f]{0,2}:/i.test(addr);
}

return view.extend({
	render: function() {
		var m, s, o;

		m = new form.Map('gwsync', _('Gateway sync: settings'),
			_('Every gateway of the LAN must use the same multicast group, port and key. Changes take effect on Save & Apply, which restarts the daemon.'));

		s = m.section(form.NamedSection, 'main', 'gwsync');
		s.addremove = false;

		s.tab('general', _('General'));
		s.tab('security', _('Security'));
		s.tab('limits', _('Limits'));

		o = s.taboption('general', form.Flag, 'enabled', _('Enabled'),
			_('Off stops the daemon and keeps it from starting at boot.'));
		o.default = o.enabled;
		o.rmempty = false;

		o = s.taboption('general', widgets.NetworkSelect, 'interface', _('Networks'),
			_('The logical networks to sync on. Default: lan.'));
		o.multiple = true;
		o.nocreate = true;
		o.noaliases = true;
		o.placeholder = 'lan';

		o = s.taboption('general', form.Value, 'group', _('Multicast group'),
			_('IPv4 or IPv6 multicast address. Default: 239.255.73.73 and ff02::7373.'));
		o.datatype = 'ipaddr("nomask")';
		o.placeholder = '239.255.73.73';
		o.validate = function(section_id, value) {
			if (value == null || value == '' || isMulticast(value))
				return true;
			return _('Not a multicast address (224.0.0.0/4 or ff00::/8)');
		};

		o = s.taboption('general', form.Value, 'port', _('UDP port'), _('Default: 7373.'));
		o.datatype = 'port';
		o.placeholder = '7373';

		o = s.taboption('general', form.ListValue, 'log_level', _('Log level'));
		o.value('', _('default (info)'));
		o.value('error', _('error'));
		o.value('warn', _('warning'));
		o.value('info', _('info'));
		o.value('debug', _('debug'));
		o.value('trace', _('trace'));

		o = s.taboption('general', form.Value, 'state_dir', _('State directory'),
			_('Where the data set and node identity are kept. The default on flash keeps them across reboots; writes are debounced.'));
		o.placeholder = '/etc/gwsync';
		o.validate = function(section_id, value) {
			if (value == null || value == '' || /^\/[^\s]*$/.test(value))
				return true;
			return _('An absolute path without spaces');
		};

		o = s.taboption('security', form.Flag, 'open', _('Open mode'),
			_('Sync without a key: datagrams are sent in clear text, unauthenticated; anyone on the LAN can read and change the data set. Only for a closed, trusted network.'));
		o.rmempty = true;

		o = s.taboption('security', form.Value, 'key_file', _('Key file'),
			_('A root-only (0600) file holding the group key from <code>gwsync genkey</code>, and optionally the next key on a second line. Preferred over the key below: /etc/config is world-readable.'));
		o.placeholder = '/etc/gwsync.key';
		o.depends('open', '0');
		// Switching to open mode and back must not lose the key.
		o.retain = true;
		o.validate = function(section_id, value) {
			var key = this.section.formvalue(section_id, 'key');

			if (value != null && value != '' && !/^\/[^\s]*$/.test(value))
				return _('An absolute path without spaces');
			if ((value == null || value == '') && (key == null || key == ''))
				return _('Set a key file or a key, or choose open mode: without one the daemon does not start');
			return true;
		};

		o = s.taboption('security', form.Value, 'key', _('Key'),
			_('The group key itself (64 hex digits or 44 base64 characters). The key file wins when both are set. Every login that may read these settings can read this key: prefer the key file.'));
		o.password = true;
		o.depends('open', '0');
		o.retain = true;
		o.validate = function(section_id, value) {
			if (value == null || value == '' || /^[0-9a-fA-F]{64}$/.test(value) ||
			    /^[A-Za-z0-9+\/_-]{43}=?$/.test(value))
				return true;
			return _('A key is 64 hex digits or 44 base64 characters');
		};

		o = s.taboption('limits', form.Value, 'max_entries', _('Maximum entries'),
			_('Keys in the store, deleted ones included, before writes are refused; 1 to 10000000. Default: 100000.'));
		// The daemon's bounds (src/config.rs): out of them it refuses to start.
		o.datatype = 'range(1,10000000)';
		o.placeholder = '100000';

		o = s.taboption('limits', form.Value, 'max_store_bytes', _('Maximum store size (bytes)'),
			_('Keys plus values of all entries, 65792 to 1073741824. Default: 16777216 (16 MiB).'));
		o.datatype = 'range(65792,1073741824)';
		o.placeholder = '16777216';

		o = s.taboption('limits', form.Value, 'tombstone_lifetime_s', _('Deleted-key lifetime (seconds)'),
			_('How long a delete is remembered so a gateway that was away cannot bring the key back. Longer than any gateway stays offline; 60 to 315360000. Default: 604800 (7 days).'));
		o.datatype = 'range(60,315360000)';
		o.placeholder = '604800';

		return m.render();
	}
});
