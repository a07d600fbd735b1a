//! The multicast socket of the group, and the interface watch.
//!
//! Method step 1: every gateway joins one UDP multicast group and sends all
//! sync traffic there; no gateway needs another's address. One socket per
//! driver carries both directions:
//!
//! - bound to the group's port with `SO_REUSEADDR` + `SO_REUSEPORT`, so several
//!   gateways (tests, the demo) can share one host: multicast datagrams are
//!   delivered to every socket bound to the port, not balanced between them;
//! - `IP_MULTICAST_ALL` / `IPV6_MULTICAST_ALL` off, so only the groups this
//!   socket joined arrive (Linux otherwise delivers any group joined by any
//!   socket on the host);
//! - TTL / hop limit 1: sync traffic never leaves the LAN;
//! - loopback on: other gateways on this host must hear us; our own copies
//!   are dropped by the engine (it knows its node id and boot id);
//! - joined per interface *by index*, as umdns and alfred do, because
//!   addresses come and go on a router while indexes only change when the
//!   interface is recreated; the outgoing interface is chosen per datagram
//!   (IPv4 `IP_PKTINFO`, IPv6 scope id) so one socket serves several
//!   interfaces.
//!
//! [`LinkWatch`] is an rtnetlink socket that becomes readable when a link or
//! address changes; the driver then re-checks its interfaces instead of
//! polling them (an idle router should not wake up for nothing).

use std::cell::Cell;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, SockaddrIn,
    SockaddrIn6,
};
use socket2::{Domain, Protocol, Socket, Type};

/// Default IPv4 group (administratively scoped, DESIGN section 4).
pub const GROUP_V4_DEFAULT: Ipv4Addr = Ipv4Addr::new(239, 255, 73, 73);
/// Default IPv6 group (link-local scope).
pub const GROUP_V6_DEFAULT: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x7373);
pub const PORT_DEFAULT: u16 = 7373;

/// What one non-blocking receive gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A whole datagram of this many bytes is at the start of the buffer.
    Datagram(usize),
    /// A datagram longer than the buffer; what was read is unusable.
    Truncated(usize),
    /// Nothing is waiting.
    Empty,
}

/// The group's socket.
#[derive(Debug)]
pub struct GroupSocket {
    socket: Socket,
    group: IpAddr,
    port: u16,
    /// The interface `IP_MULTICAST_IF` names now (0: the kernel's choice),
    /// so it is set only when a send goes out of another one.
    multicast_if: Cell<u32>,
}

impl GroupSocket {
    /// Opens and binds the socket; joins nothing yet (see [`GroupSocket::join`]).
    pub fn open(group: IpAddr, port: u16) -> io::Result<GroupSocket> {
        let domain = match group {
            IpAddr::V4(_) => Domain::IPV4,
            IpAddr::V6(_) => Domain::IPV6,
        };
        let socket = Socket::new(
            domain,
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::UDP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        match group {
            IpAddr::V4(v4) => {
                // Binding to the group address (Linux allows it) filters out
                // unicast and other groups sent to the same port.
                socket.bind(&SocketAddr::V4(SocketAddrV4::new(v4, port)).into())?;
                tolerate_missing_option(socket.set_multicast_all_v4(false))?;
                socket.set_multicast_ttl_v4(1)?;
                socket.set_multicast_loop_v4(true)?;
            }
            IpAddr::V6(_) => {
                socket.set_only_v6(true)?;
                socket.bind(
                    &SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)).into(),
                )?;
                tolerate_missing_option(socket.set_multicast_all_v6(false))?;
                socket.set_multicast_hops_v6(1)?;
                socket.set_multicast_loop_v6(true)?;
            }
        }
        Ok(GroupSocket {
            socket,
            group,
            port,
            multicast_if: Cell::new(0),
        })
    }

    pub fn group(&self) -> IpAddr {
        self.group
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Joins the group on one interface; index 0 lets the kernel pick the
    /// interface of the route to the group (the no `--interface` default).
    pub fn join(&self, ifindex: u32) -> io::Result<()> {
        match self.group {
            IpAddr::V4(v4) => set_ip_mreqn(&self.socket, libc::IP_ADD_MEMBERSHIP, v4, ifindex),
            IpAddr::V6(v6) => self.socket.join_multicast_v6(&v6, ifindex),
        }
    }

    /// Leaves the group on one interface. Errors are expected when the
    /// interface is already gone, and harmless.
    pub fn leave(&self, ifindex: u32) -> io::Result<()> {
        match self.group {
            IpAddr::V4(v4) => set_ip_mreqn(&self.socket, libc::IP_DROP_MEMBERSHIP, v4, ifindex),
            IpAddr::V6(v6) => self.socket.leave_multicast_v6(&v6, ifindex),
        }
    }

    /// Sends one datagram to the group, out of interface `ifindex` (0: the
    /// kernel's choice).
    pub fn send(&self, ifindex: u32, bytes: &[u8]) -> io::Result<usize> {
        let fd = self.socket.as_raw_fd();
        let iov = [io::IoSlice::new(bytes)];
        let sent = match self.group {
            IpAddr::V4(v4) => {
                let dest = SockaddrIn::from(SocketAddrV4::new(v4, self.port));
                if ifindex != self.multicast_if.get() {
                    set_ip_mreqn(
                        &self.socket,
                        libc::IP_MULTICAST_IF,
                        Ipv4Addr::UNSPECIFIED,
                        ifindex,
                    )?;
                    self.multicast_if.set(ifindex);
                }
                socket::sendmsg(fd, &iov, &[], MsgFlags::MSG_DONTWAIT, Some(&dest))
            }
            IpAddr::V6(v6) => {
                // The scope id picks the interface for a link-local group.
                let dest = SockaddrIn6::from(SocketAddrV6::new(v6, self.port, 0, ifindex));
                socket::sendmsg(fd, &iov, &[], MsgFlags::MSG_DONTWAIT, Some(&dest))
            }
        };
        sent.map_err(io::Error::from)
    }

    /// Receives one datagram without blocking. `MSG_TRUNC` makes the kernel
    /// report a datagram's real length, so one larger than `buf` is noticed
    /// instead of being merged half-read.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC;
        match socket::recv(self.socket.as_raw_fd(), buf, flags) {
            Ok(len) if len > buf.len() => Ok(Received::Truncated(len)),
            Ok(len) => Ok(Received::Datagram(len)),
            Err(Errno::EAGAIN) => Ok(Received::Empty),
            Err(errno) => Err(errno.into()),
        }
    }

    /// [`GroupSocket::recv`] that also says who sent the datagram, so a
    /// gateway can name the addresses it hears with another key.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(Received, Option<IpAddr>)> {
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC;
        let capacity = buf.len();
        let mut iov = [io::IoSliceMut::new(buf)];
        let received = socket::recvmsg::<socket::SockaddrStorage>(
            self.socket.as_raw_fd(),
            &mut iov,
            None,
            flags,
        )
        .map(|message| (message.bytes, message.flags, message.address));
        match received {
            Ok((bytes, msg_flags, address)) => {
                let from = address.and_then(|address| {
                    address
                        .as_sockaddr_in()
                        .map(|v4| IpAddr::V4(v4.ip()))
                        .or_else(|| address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                });
                let received = if bytes > capacity || msg_flags.contains(MsgFlags::MSG_TRUNC) {
                    Received::Truncated(bytes)
                } else {
                    Received::Datagram(bytes)
                };
                Ok((received, from))
            }
            Err(Errno::EAGAIN) => Ok((Received::Empty, None)),
            Err(errno) => Err(errno.into()),
        }
    }
}

impl AsFd for GroupSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl AsRawFd for GroupSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Sets an IPv4 multicast option that takes a `struct ip_mreqn` (group and
/// interface index): `IP_ADD_MEMBERSHIP`, `IP_DROP_MEMBERSHIP` and
/// `IP_MULTICAST_IF` (by index, Linux 3.5+, which neither socket2 nor nix
/// offers).
///
/// Two qemu-user quirks shape it, because the test suite runs under qemu
/// for the router CPUs. `IP_MULTICAST_IF` replaces an `IP_PKTINFO` control
/// message per send: qemu passes control messages through without
/// byte-order conversion, so on big-endian targets the index arrived
/// scrambled (ENODEV), while this option is converted. And qemu declares
/// `imr_ifindex` as a C long: on a 64-bit guest it converts the index only
/// when the option is 16 bytes long, and otherwise hands the kernel an
/// uninitialised index (ENODEV). The kernel reads the first 12 bytes of
/// anything at least that long, so the request carries a zeroed tail up to
/// the size of a long: correct on every kernel, and under qemu too.
#[allow(unsafe_code)]
fn set_ip_mreqn(
    socket: &Socket,
    option: libc::c_int,
    group: Ipv4Addr,
    ifindex: u32,
) -> io::Result<()> {
    #[repr(C)]
    struct PaddedMreqn {
        request: libc::ip_mreqn,
        tail: [u8; TAIL],
    }
    const TAIL: usize = std::mem::size_of::<libc::c_long>() - std::mem::size_of::<libc::c_int>();
    let padded = PaddedMreqn {
        request: libc::ip_mreqn {
            imr_multiaddr: libc::in_addr {
                s_addr: u32::from(group).to_be(),
            },
            imr_address: libc::in_addr { s_addr: 0 },
            imr_ifindex: ifindex as libc::c_int,
        },
        tail: [0; TAIL],
    };
    // SAFETY: `padded` is fully initialised and outlives the call, and the
    // length passed is exactly its size.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            option,
            (&padded as *const PaddedMreqn).cast(),
            std::mem::size_of::<PaddedMreqn>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The index of a network interface, `None` when it does not exist.
pub fn interface_index(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name)
        .ok()
        .filter(|&index| index != 0)
}

/// Whether an interface is up with its lower layer up (carrier). Reads
/// sysfs, which every OpenWrt kernel has, to stay free of ioctls.
pub fn interface_is_up(name: &str) -> bool {
    // A name with a slash would escape /sys/class/net.
    if name.contains('/') || name.is_empty() {
        return false;
    }
    match std::fs::read_to_string(format!("/sys/class/net/{name}/operstate")) {
        // Loopback and some virtual links report "unknown" while working.
        Ok(state) => matches!(state.trim(), "up" | "unknown"),
        Err(_) => false,
    }
}

/// An rtnetlink socket subscribed to link and address changes.
#[derive(Debug)]
pub struct LinkWatch {
    fd: OwnedFd,
}

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

impl LinkWatch {
    pub fn open() -> io::Result<LinkWatch> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
        Ok(LinkWatch { fd })
    }

    /// Reads and discards every pending notification; `true` if there was
    /// any (or the socket overflowed, which also means "something changed").
    pub fn drain(&self) -> bool {
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            match socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => return any,
                Ok(_) => any = true,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return any,
                // ENOBUFS: notifications were lost; re-check everything.
                Err(_) => return true,
            }
        }
    }
}

impl AsFd for LinkWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `IP_MULTICAST_ALL` / `IPV6_MULTICAST_ALL` only narrow what a socket
/// hears (the engine drops foreign datagrams anyway); a kernel or emulator
/// without them (qemu-user says ENOPROTOOPT) must not stop the daemon.
fn tolerate_missing_option(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(error) if error.raw_os_error() == Some(libc::ENOPROTOOPT) => {
            log::debug!("socket option not supported here: {error}");
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_interface_is_found_and_up() {
        let index = interface_index("lo").expect("every Linux host has lo");
        assert!(index > 0);
        assert!(interface_is_up("lo"));
        assert_eq!(interface_index("gwsync-nonexistent0"), None);
        assert!(!interface_is_up("../lo"));
    }

    #[test]
    fn two_sockets_on_one_port_both_hear_a_datagram() {
        let port = 40_000 + (std::process::id() % 20_000) as u16;
        let lo = interface_index("lo").unwrap();
        let group = IpAddr::V4(GROUP_V4_DEFAULT);
        let a = GroupSocket::open(group, port).unwrap();
        let b = GroupSocket::open(group, port).unwrap();
        a.join(lo).unwrap();
        b.join(lo).unwrap();
        a.send(lo, b"hello").unwrap();
        let mut buf = [0u8; 16];
        for socket in [&a, &b] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                match socket.recv(&mut buf).unwrap() {
                    Received::Datagram(len) => {
                        assert_eq!(&buf[..len], b"hello");
                        break;
                    }
                    Received::Truncated(len) => panic!("truncated {len}"),
                    Received::Empty => {
                        assert!(std::time::Instant::now() < deadline, "no datagram");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        }
        a.send(lo, &[7u8; 64]).unwrap();
        let mut small = [0u8; 8];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match b.recv(&mut small).unwrap() {
                Received::Truncated(len) => {
                    assert_eq!(len, 64);
                    break;
                }
                Received::Datagram(len) => panic!("not truncated: {len}"),
                Received::Empty => {
                    assert!(std::time::Instant::now() < deadline, "no datagram");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }
}
