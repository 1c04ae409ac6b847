//! Login protection shared by every protocol that checks passwords (IMAP LOGIN/AUTHENTICATE,
//! SMTP AUTH): [`throttle::LoginThrottle`].

pub mod slots;
pub mod throttle;

pub use throttle::{LoginAttempt, LoginThrottle, ThrottleConfig, Throttled};
