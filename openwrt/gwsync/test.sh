#!/bin/sh
# Runtime check for the packages feed CI: it runs this with the package name
# and version; the version must be in `gwsync --version`. No grep -q, so the
# matched line shows in the CI log.

case "$1" in
gwsync)
	gwsync --version 2>&1 | grep -F "$2"
	;;
esac
