//! Session slots per client address, shared by the listeners that count sessions this way
//! (IMAP, ManageSieve): at most `max_sessions` in all and `max_sessions_per_ip` per client
//! address (IPv6 per /64, see [`client_key`]). A [`Slot`] frees itself when dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::throttle::client_key;

/// The sessions open per client address.
#[derive(Default)]
pub struct Slots {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One session's place; dropping it frees the place.
pub struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    /// A slot for a session from `ip`, or `None` when the total or the address is at its limit.
    pub fn acquire(
        slots: &Arc<Slots>,
        ip: IpAddr,
        max_sessions: usize,
        max_sessions_per_ip: usize,
    ) -> Option<Slot> {
        let ip = client_key(ip);
        let mut per_ip = slots.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = per_ip.values().sum();
        let mine = per_ip.get(&ip).copied().unwrap_or(0);
        if total >= max_sessions || mine >= max_sessions_per_ip {
            return None;
        }
        per_ip.insert(ip, mine + 1);
        Some(Slot {
            slots: Arc::clone(slots),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_ip = self.slots.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4), v4);
        assert_eq!(client_key(mapped), v4);
        let slots = Arc::new(Slots::default());
        let first = Slots::acquire(&slots, a, 100, 2);
        let second = Slots::acquire(&slots, b, 100, 2);
        assert!(first.is_some() && second.is_some());
        assert!(Slots::acquire(&slots, "2001:db8:1:2::77".parse().unwrap(), 100, 2).is_none());
        assert!(Slots::acquire(&slots, c, 100, 2).is_some());
        drop(first);
        assert!(Slots::acquire(&slots, a, 100, 2).is_some());
    }
}
