# Stand-in for OpenWrt's /lib/functions.sh: the uci helpers init scripts use.
# Values live in CONFIG_<section>_<option> variables, as in OpenWrt, so
# config_get and friends behave the same (default when unset or empty, lists
# joined with spaces).

append() {
	eval "$1=\"\${$1:+\${$1}\${3:- }}\$2\""
}

list_contains() {
	eval "_lc_val=\" \${$1} \""
	case "$_lc_val" in
	*" $2 "*) return 0 ;;
	esac
	return 1
}

config_set() {
	eval "CONFIG_$1_$2=\$3"
}

config_get() {
	case "$3" in
	"") eval "echo \"\${CONFIG_$1_$2:-\$4}\"" ;;
	*) eval "$1=\"\${CONFIG_$2_$3:-\$4}\"" ;;
	esac
}

config_get_bool() {
	config_get _cgb_val "$2" "$3" "$4"
	case "$_cgb_val" in
	1 | on | true | yes | enabled) _cgb_val=1 ;;
	0 | off | false | no | disabled) _cgb_val=0 ;;
	*) _cgb_val="$4" ;;
	esac
	eval "$1=\$_cgb_val"
}

# The three words of uci syntax, called while the file is sourced.
package() { return 0; }

config() {
	CONFIG_NUM_SECTIONS=$((CONFIG_NUM_SECTIONS + 1))
	CONFIG_SECTION=${2:-cfg$CONFIG_NUM_SECTIONS}
	append CONFIG_SECTIONS "$CONFIG_SECTION"
	config_set "$CONFIG_SECTION" TYPE "$1"
}

option() {
	_opt_name=$1
	shift
	config_set "$CONFIG_SECTION" "$_opt_name" "$*"
}

list() {
	_list_name=$1
	shift
	config_get _list_len "$CONFIG_SECTION" "${_list_name}_LENGTH" 0
	[ "$_list_len" = 0 ] && append CONFIG_LIST_STATE "${CONFIG_SECTION}_${_list_name}"
	_list_len=$((_list_len + 1))
	config_set "$CONFIG_SECTION" "${_list_name}_ITEM$_list_len" "$*"
	config_set "$CONFIG_SECTION" "${_list_name}_LENGTH" "$_list_len"
	append "CONFIG_${CONFIG_SECTION}_${_list_name}" "$*" " "
}

config_load() {
	# Forget the previous load, as uci_load does: lists would otherwise
	# grow on every call.
	for _cl_var in $CONFIG_LIST_STATE; do
		eval "CONFIG_${_cl_var}="
		eval "CONFIG_${_cl_var}_LENGTH="
	done
	for _cl_sec in $CONFIG_SECTIONS; do
		eval "CONFIG_${_cl_sec}_TYPE="
	done
	CONFIG_LIST_STATE=
	CONFIG_SECTIONS=
	CONFIG_NUM_SECTIONS=0
	CONFIG_SECTION=
	[ -f "$IPKG_INSTROOT/etc/config/$1" ] || return 1
	. "$IPKG_INSTROOT/etc/config/$1"
}

config_foreach() {
	_cf_fn=$1
	_cf_type=$2
	shift 2
	for _cf_sec in $CONFIG_SECTIONS; do
		config_get _cf_t "$_cf_sec" TYPE
		[ -n "$_cf_type" ] && [ "$_cf_t" != "$_cf_type" ] && continue
		"$_cf_fn" "$_cf_sec" "$@"
	done
}

config_list_foreach() {
	_clf_sec=$1
	_clf_opt=$2
	_clf_fn=$3
	shift 3
	config_get _clf_len "$_clf_sec" "${_clf_opt}_LENGTH" 0
	_clf_i=1
	while [ "$_clf_i" -le "$_clf_len" ]; do
		config_get _clf_val "$_clf_sec" "${_clf_opt}_ITEM$_clf_i"
		"$_clf_fn" "$_clf_val" "$@"
		_clf_i=$((_clf_i + 1))
	done
}
