# Stand-in for OpenWrt's /lib/functions/procd.sh: each call is recorded in
# $IPKG_INSTROOT/.fixture/procd.log as one line, the function name and its
# arguments separated by the byte 0x1f, instead of being sent to procd.

_procd_record() {
	{
		printf '%s' "$1"
		shift
		for _pr_arg in "$@"; do
			printf '\037%s' "$_pr_arg"
		done
		printf '\n'
	} >> "$IPKG_INSTROOT/.fixture/procd.log"
}

procd_lock() { return 0; }
procd_open_service() { _procd_record procd_open_service "$@"; }
procd_close_service() {
	# Like procd.sh: the triggers are collected when the service is sent.
	service_triggers
	_procd_record procd_close_service "$@"
	# What happens meanwhile elsewhere (netifd bringing a network up), once.
	if [ -f "$IPKG_INSTROOT/.fixture/on_close_service" ]; then
		. "$IPKG_INSTROOT/.fixture/on_close_service"
		rm -f "$IPKG_INSTROOT/.fixture/on_close_service"
	fi
}
procd_open_instance() { _procd_record procd_open_instance "$@"; }
procd_close_instance() { _procd_record procd_close_instance "$@"; }
procd_set_param() { _procd_record procd_set_param "$@"; }
procd_append_param() { _procd_record procd_append_param "$@"; }
procd_add_reload_trigger() { _procd_record procd_add_reload_trigger "$@"; }
procd_add_interface_trigger() { _procd_record procd_add_interface_trigger "$@"; }
procd_add_reload_interface_trigger() { _procd_record procd_add_reload_interface_trigger "$@"; }
procd_add_raw_trigger() { _procd_record procd_add_raw_trigger "$@"; }
procd_add_config_trigger() { _procd_record procd_add_config_trigger "$@"; }
procd_open_trigger() { _procd_record procd_open_trigger "$@"; }
procd_close_trigger() { _procd_record procd_close_trigger "$@"; }
procd_open_data() { _procd_record procd_open_data "$@"; }
procd_close_data() { _procd_record procd_close_data "$@"; }
procd_add_validation() { _procd_record procd_add_validation "$@"; }
procd_kill() { _procd_record procd_kill "$@"; }
procd_send_signal() { _procd_record procd_send_signal "$@"; }
procd_running() {
	_procd_record procd_running "$@"
	return 1
}
