//! Who may use the console, and how a browser proves it.
//!
//! - Users come from a secret file (`CONVEYOR_CONSOLE_USERS_FILE`): one `name:role:password` a line,
//!   the role `operator` (reads and acts) or `viewer` (reads everything, changes nothing). There is
//!   no default user or password. Without the file the console serves read-only, and only on a
//!   loopback address.
//! - A login gives a session: a random id in a cookie that is HttpOnly and SameSite=Strict (Secure
//!   when the console's public URL is https), kept in memory for [`SESSION_TTL`].
//! - Every form that changes something carries the session's CSRF token, and every POST must come
//!   from the console's own origin (`Origin`, or `Referer` when a browser sends no `Origin`).
//! - Failed logins are limited per client address and per user name ([`LoginLimiter`]).
//! - Passwords are compared through HMAC digests, in constant time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{KeyInit as _, Mac as _};
use rand::RngExt as _;

/// How long a session lasts after its login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Failed logins allowed per address or user name within [`LOGIN_WINDOW`].
pub const LOGIN_FAILURES_ALLOWED: u32 = 5;
pub const LOGIN_WINDOW: Duration = Duration::from_secs(60);

/// The name of the session cookie.
pub const COOKIE: &str = "conveyor_console";

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads everything and runs replays and purges.
    Operator,
    /// Reads everything, changes nothing.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The users of the secret file, with their passwords as HMAC digests under a key of this process.
pub struct Users {
    key: [u8; 32],
    users: HashMap<String, (Role, Vec<u8>)>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("names", &self.users.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Users {
    /// Reads the users file: `name:role:password` a line; `#` starts a comment line.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            anyhow::anyhow!(
                "CONVEYOR_CONSOLE_USERS_FILE: cannot read {}: {err}",
                path.display()
            )
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> anyhow::Result<Self> {
        let key: [u8; 32] = rand::rng().random();
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let problem = |what: &str| {
                anyhow::anyhow!(
                    "CONVEYOR_CONSOLE_USERS_FILE: {} line {}: {what} (each line is name:role:password, the role operator or viewer)",
                    path.display(),
                    index + 1
                )
            };
            let mut parts = line.splitn(3, ':');
            let (Some(name), Some(role), Some(password)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(problem("not name:role:password"));
            };
            let role = match role {
                "operator" => Role::Operator,
                "viewer" => Role::Viewer,
                _ => {
                    return Err(problem(&format!(
                        "the role {role:?} is neither operator nor viewer"
                    )));
                }
            };
            if name.is_empty() {
                return Err(problem("the name is empty"));
            }
            if password.chars().count() < 12 {
                return Err(problem("the password is shorter than 12 characters"));
            }
            if users
                .insert(name.to_owned(), (role, digest(&key, password)))
                .is_some()
            {
                return Err(problem(&format!("{name} is named twice")));
            }
        }
        if users.is_empty() {
            anyhow::bail!(
                "CONVEYOR_CONSOLE_USERS_FILE: {} names no user (each line is name:role:password)",
                path.display()
            );
        }
        Ok(Self { key, users })
    }

    /// The role of `name` if `password` is theirs.
    pub fn check(&self, name: &str, password: &str) -> Option<Role> {
        // Unknown names cost the same digest as known ones.
        let (role, expected) = match self.users.get(name) {
            Some((role, expected)) => (Some(*role), expected.as_slice()),
            None => (None, &[0u8; 32][..]),
        };
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("any key length");
        mac.update(password.as_bytes());
        mac.verify_slice(expected).ok().and(role)
    }
}

fn digest(key: &[u8], password: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).expect("any key length");
    mac.update(password.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// Equal in constant time (for CSRF tokens).
pub fn same_secret(a: &str, b: &str) -> bool {
    let key = [7u8; 32];
    let mut mac = HmacSha256::new_from_slice(&key).expect("any key length");
    mac.update(a.as_bytes());
    mac.verify_slice(&digest(&key, b)).is_ok()
}

/// A random token, URL-safe.
pub fn token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A logged-in user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user: String,
    pub role: Role,
    pub csrf: String,
    expires: Instant,
}

impl Session {
    /// The read-only session of every request when no users are configured.
    pub fn anonymous() -> Self {
        Self {
            user: "anonymous".to_owned(),
            role: Role::Viewer,
            csrf: token(),
            expires: Instant::now() + Duration::from_secs(10 * 365 * 24 * 3600),
        }
    }

    pub fn may_act(&self) -> bool {
        self.role == Role::Operator
    }
}

/// The sessions of this process.
#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Opens a session for `user`; returns its id.
    pub fn open(&self, user: &str, role: Role) -> String {
        let id = token();
        let session = Session {
            user: user.to_owned(),
            role,
            csrf: token(),
            expires: Instant::now() + SESSION_TTL,
        };
        let mut sessions = self.sessions.lock().expect("no panics while locked");
        let now = Instant::now();
        sessions.retain(|_, session| session.expires > now);
        sessions.insert(id.clone(), session);
        id
    }

    pub fn get(&self, id: &str) -> Option<Session> {
        let sessions = self.sessions.lock().expect("no panics while locked");
        sessions
            .get(id)
            .filter(|session| session.expires > Instant::now())
            .cloned()
    }

    pub fn close(&self, id: &str) {
        self.sessions
            .lock()
            .expect("no panics while locked")
            .remove(id);
    }
}

/// Counts failed logins per client address and per user name, each over a sliding window.
#[derive(Default)]
pub struct LoginLimiter {
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

impl LoginLimiter {
    fn keys(address: Option<IpAddr>, user: &str) -> Vec<String> {
        let mut keys = vec![format!("user:{user}")];
        if let Some(address) = address {
            keys.push(format!("address:{address}"));
        }
        keys
    }

    /// How long until another try is allowed, if none is now.
    pub fn blocked(&self, address: Option<IpAddr>, user: &str) -> Option<Duration> {
        let mut failures = self.failures.lock().expect("no panics while locked");
        let now = Instant::now();
        let mut wait = None;
        for key in Self::keys(address, user) {
            let times = failures.entry(key).or_default();
            times.retain(|at| now.duration_since(*at) < LOGIN_WINDOW);
            if times.len() as u32 >= LOGIN_FAILURES_ALLOWED {
                let until = LOGIN_WINDOW - now.duration_since(times[0]);
                wait = Some(wait.map_or(until, |w: Duration| w.max(until)));
            }
        }
        wait
    }

    pub fn failed(&self, address: Option<IpAddr>, user: &str) {
        let mut failures = self.failures.lock().expect("no panics while locked");
        for key in Self::keys(address, user) {
            failures.entry(key).or_default().push(Instant::now());
        }
    }
}

/// Whether a POST comes from the console's own origin: its `Origin` (or, without one, its
/// `Referer`) names `expected` (`scheme://host[:port]`).
pub fn same_origin(origin: Option<&str>, referer: Option<&str>, expected: &[String]) -> bool {
    let given = match (origin, referer) {
        (Some(origin), _) => origin.trim_end_matches('/').to_owned(),
        (None, Some(referer)) => {
            let Some((scheme, rest)) = referer.split_once("://") else {
                return false;
            };
            let host = rest.split('/').next().unwrap_or_default();
            format!("{scheme}://{host}")
        }
        (None, None) => return false,
    };
    expected.contains(&given)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> Users {
        Users::parse(
            Path::new("users"),
            "# operators\nalice:operator:correct horse battery\nbob:viewer:staple staple staple\n",
        )
        .unwrap()
    }

    #[test]
    fn a_password_gives_its_role_and_nothing_else_does() {
        let users = users();
        assert_eq!(
            users.check("alice", "correct horse battery"),
            Some(Role::Operator)
        );
        assert_eq!(
            users.check("bob", "staple staple staple"),
            Some(Role::Viewer)
        );
        assert_eq!(users.check("alice", "staple staple staple"), None);
        assert_eq!(users.check("carol", "correct horse battery"), None);
        assert_eq!(users.check("alice", ""), None);
    }

    #[test]
    fn a_bad_users_file_names_its_line() {
        let err = Users::parse(
            Path::new("/run/secrets/users"),
            "alice:admin:correct horse battery",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/run/secrets/users line 1"), "{err}");
        assert!(
            err.contains("\"admin\" is neither operator nor viewer"),
            "{err}"
        );
        let err = Users::parse(Path::new("u"), "\nalice:operator:short")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("shorter than 12"),
            "{err}"
        );
        let err = Users::parse(Path::new("u"), "# nobody\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("names no user"), "{err}");
        assert!(!err.contains("short"), "no password is repeated: {err}");
    }

    #[test]
    fn failed_logins_are_limited_per_user_and_address() {
        let limiter = LoginLimiter::default();
        let address = Some("10.0.0.1".parse().unwrap());
        for _ in 0..LOGIN_FAILURES_ALLOWED {
            assert_eq!(limiter.blocked(address, "alice"), None);
            limiter.failed(address, "alice");
        }
        assert!(limiter.blocked(address, "alice").is_some());
        assert!(
            limiter.blocked(address, "bob").is_some(),
            "the address is blocked"
        );
        assert!(
            limiter.blocked(None, "alice").is_some(),
            "the name is blocked"
        );
        assert_eq!(
            limiter.blocked(Some("10.0.0.2".parse().unwrap()), "bob"),
            None
        );
    }

    #[test]
    fn only_the_consoles_own_origin_may_post() {
        let expected = vec!["http://127.0.0.1:9480".to_owned()];
        assert!(same_origin(Some("http://127.0.0.1:9480"), None, &expected));
        assert!(!same_origin(Some("http://evil.example"), None, &expected));
        assert!(same_origin(
            None,
            Some("http://127.0.0.1:9480/letters?x=1"),
            &expected
        ));
        assert!(!same_origin(
            None,
            Some("http://127.0.0.1:9481/"),
            &expected
        ));
        assert!(!same_origin(None, None, &expected));
    }

    #[test]
    fn csrf_tokens_compare_exactly() {
        let a = token();
        assert!(same_secret(&a, &a.clone()));
        assert!(!same_secret(&a, &token()));
        assert!(!same_secret(&a, ""));
    }
}
