# Stand-in for OpenWrt's /lib/functions/network.sh: the logical network to
# Linux device map comes from $IPKG_INSTROOT/.fixture/network instead of
# netifd over ubus.

# network_get_device <var> <network>: 1 when the network has no device.
network_get_device() {
	eval "$1="
	[ -f "$IPKG_INSTROOT/.fixture/network" ] || return 1
	while read -r _ngd_net _ngd_dev; do
		if [ "$_ngd_net" = "$2" ] && [ -n "$_ngd_dev" ]; then
			eval "$1=\$_ngd_dev"
			return 0
		fi
	done < "$IPKG_INSTROOT/.fixture/network"
	return 1
}

# network_flush_cache: the fixture is read afresh every time.
network_flush_cache() { :; }
