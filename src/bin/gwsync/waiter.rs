//! The daemon's wait: every descriptor it serves in one epoll set.
//!
//! poll() arms a wait on each descriptor and disarms it again on every
//! call; a receiving gateway wakes once per datagram, and that work (five
//! descriptors) cost about as much as handling the datagram. An epoll set
//! is armed once, and a wake costs only what is ready.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

/// Ready descriptors reported per wake; more stay ready for the next.
const EVENTS_PER_WAIT: usize = 16;

/// What to wait for on one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    pub readable: bool,
    pub writable: bool,
}

impl Interest {
    pub const READABLE: Interest = Interest {
        readable: true,
        writable: false,
    };

    fn flags(self) -> EpollFlags {
        let mut flags = EpollFlags::empty();
        flags.set(EpollFlags::EPOLLIN, self.readable);
        flags.set(EpollFlags::EPOLLOUT, self.writable);
        flags
    }
}

pub struct Waiter {
    epoll: Epoll,
    /// What the set holds, in the order the caller named it; empty after
    /// a failure, so the next wait arms it afresh.
    armed: Vec<(RawFd, Interest)>,
    /// The caller's count of descriptors opened so far when the set was
    /// armed.
    opened: u64,
    events: [EpollEvent; EVENTS_PER_WAIT],
    /// The last wait's ready descriptors, kept so a wake allocates nothing.
    ready: Vec<RawFd>,
}

impl Waiter {
    pub fn new() -> nix::Result<Waiter> {
        Ok(Waiter {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            armed: Vec::new(),
            opened: 0,
            events: [EpollEvent::empty(); EVENTS_PER_WAIT],
            ready: Vec::with_capacity(EVENTS_PER_WAIT),
        })
    }

    /// Waits until one of `wanted` is ready or `timeout` passes, and
    /// returns the descriptors that are. `opened` must grow whenever the
    /// caller opens (or accepts) a descriptor: a closed descriptor leaves
    /// the epoll set by itself and its number may come back as another
    /// file, which only a new count tells apart.
    pub fn wait(
        &mut self,
        wanted: &[(BorrowedFd<'_>, Interest)],
        opened: u64,
        timeout: EpollTimeout,
    ) -> nix::Result<&[RawFd]> {
        if let Err(errno) = self.arm(wanted, opened) {
            self.armed.clear();
            return Err(errno);
        }
        let count = self.epoll.wait(&mut self.events, timeout)?;
        self.ready.clear();
        self.ready.extend(
            self.events[..count]
                .iter()
                .map(|event| event.data() as RawFd),
        );
        Ok(&self.ready)
    }

    fn arm(&mut self, wanted: &[(BorrowedFd<'_>, Interest)], opened: u64) -> nix::Result<()> {
        let same_descriptors = opened == self.opened
            && self.armed.len() == wanted.len()
            && self
                .armed
                .iter()
                .zip(wanted)
                .all(|((armed, _), (fd, _))| *armed == fd.as_raw_fd());
        if !same_descriptors {
            // A fresh set: nothing stale in it can wake us for a file that
            // is no longer ours.
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
            for (fd, interest) in wanted {
                epoll.add(fd, event(*fd, *interest))?;
            }
            self.epoll = epoll;
            self.armed = wanted
                .iter()
                .map(|(fd, interest)| (fd.as_raw_fd(), *interest))
                .collect();
            self.opened = opened;
            return Ok(());
        }
        for ((_, armed), (fd, interest)) in self.armed.iter_mut().zip(wanted) {
            if armed != interest {
                self.epoll.modify(fd, &mut event(*fd, *interest))?;
                *armed = *interest;
            }
        }
        Ok(())
    }
}

fn event(fd: BorrowedFd<'_>, interest: Interest) -> EpollEvent {
    EpollEvent::new(interest.flags(), fd.as_raw_fd() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    const NOW: EpollTimeout = EpollTimeout::ZERO;

    #[test]
    fn reports_only_what_is_ready_and_follows_interest_changes() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, _d) = UnixStream::pair().unwrap();
        let mut waiter = Waiter::new().unwrap();
        let readable = [
            (b.as_fd(), Interest::READABLE),
            (c.as_fd(), Interest::READABLE),
        ];
        assert!(waiter.wait(&readable, 0, NOW).unwrap().is_empty());
        a.write_all(b"x").unwrap();
        assert_eq!(waiter.wait(&readable, 0, NOW).unwrap(), [b.as_raw_fd()]);
        // c can always be written: asking for that wakes at once.
        let writable = Interest {
            readable: false,
            writable: true,
        };
        let both = [(b.as_fd(), Interest::READABLE), (c.as_fd(), writable)];
        let mut ready = waiter.wait(&both, 0, NOW).unwrap().to_vec();
        ready.sort();
        let mut expected = vec![b.as_raw_fd(), c.as_raw_fd()];
        expected.sort();
        assert_eq!(ready, expected);
    }

    #[test]
    fn a_reused_descriptor_number_is_armed_again() {
        let mut waiter = Waiter::new().unwrap();
        let (_old_peer, old) = UnixStream::pair().unwrap();
        let mut old = std::os::fd::OwnedFd::from(old);
        let number = old.as_raw_fd();
        let armed = [(old.as_fd(), Interest::READABLE)];
        assert!(waiter.wait(&armed, 1, NOW).unwrap().is_empty());
        // Another file under the same number, as when a client hangs up
        // and the next one is accepted: dup2 closes the old file (epoll
        // forgets it) without letting another thread take the number.
        let (mut peer, new) = UnixStream::pair().unwrap();
        nix::unistd::dup2(&new, &mut old).unwrap();
        peer.write_all(b"y").unwrap();
        // `old` now owns that number, and so the new file.
        let wanted = [(old.as_fd(), Interest::READABLE)];
        assert!(
            waiter.wait(&wanted, 1, NOW).unwrap().is_empty(),
            "the same count keeps the arming of the closed file"
        );
        assert_eq!(waiter.wait(&wanted, 2, NOW).unwrap(), [number]);
    }
}
