//! Who a request is: the session cookie, and the checks every change (POST) passes.
//!
//! The cookie holds the session's 64 hex characters and nothing else; PostgreSQL keeps the session (only as
//! its SHA-256) and says whose it is. It is `HttpOnly` (no script reads it), `SameSite=Lax` (another site's
//! form posts arrive without it) and `Secure` over https. Embedded in another site's page, a frame's requests
//! are third-party, so the cookie must be `SameSite=None; Secure` there, and the CSRF token (a second random
//! value from the session, in every form, compared in constant time) plus the same-origin check on `Origin`
//! and `Sec-Fetch-Site` carry the protection alone.

use hyper::header::{HeaderMap, HeaderValue, COOKIE, ORIGIN};

pub(super) const COOKIE_NAME: &str = "walhook_portal";

/// A live session, as `walhook.portal_session` returned it.
#[derive(Clone, Debug)]
pub(super) struct Session {
    /// The cookie's value (the operator functions take it).
    pub token: String,
    pub tenant: Option<String>,
    pub operator: bool,
    pub csrf: String,
    /// The tenant an operator session looks at.
    pub viewing: Option<String>,
}

impl Session {
    /// The tenant whose rows the request's transaction sees: the session's own, or the one an operator views.
    pub(super) fn scope(&self) -> Option<&str> {
        self.tenant.as_deref().or(self.viewing.as_deref())
    }
}

/// The session token of the request's cookie, when it has the shape of one.
pub(super) fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim().to_string())
        .filter(|v| is_token(v))
}

/// 64 lowercase hex characters, as walhook.portal_token() makes them.
pub(super) fn is_token(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// How the cookie is sent: its path, and whether the portal is served over https and embedded.
#[derive(Clone, Debug)]
pub(super) struct CookiePolicy {
    pub path: String,
    pub secure: bool,
    pub embedded: bool,
}

impl CookiePolicy {
    fn attributes(&self) -> String {
        let same_site = match (self.embedded, self.secure) {
            // browsers send third-party cookies (a frame in the application's page) only with None + Secure
            (true, true) => "; SameSite=None; Secure",
            (_, true) => "; SameSite=Lax; Secure",
            (_, false) => "; SameSite=Lax",
        };
        format!("; HttpOnly; Path={}{same_site}", self.path)
    }

    pub(super) fn set(&self, session: &str, max_age: u64) -> HeaderValue {
        let value = format!(
            "{COOKIE_NAME}={session}; Max-Age={max_age}{}",
            self.attributes()
        );
        HeaderValue::from_str(&value).expect("hex, digits and a checked path")
    }

    pub(super) fn clear(&self) -> HeaderValue {
        let value = format!("{COOKIE_NAME}=; Max-Age=0{}", self.attributes());
        HeaderValue::from_str(&value).expect("a checked path")
    }
}

/// Equal strings, in time that does not depend on where they differ.
pub(super) fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses a change that a browser says comes from another site. Requests without these headers (old browsers,
/// scripts) rely on the CSRF token alone.
///
/// `Origin: null` passes only beside `Sec-Fetch-Site: same-origin`: the portal's pages are sent with
/// `Referrer-Policy: no-referrer`, under which browsers send their own forms' POSTs with `Origin: null` (the
/// Fetch standard's "serialize a request origin"), while Sec-Fetch-Site still says where the form came from.
pub(super) fn same_origin(headers: &HeaderMap, origin: &str) -> Result<(), String> {
    let site = headers
        .get("sec-fetch-site")
        .map(|site| site.to_str().unwrap_or(""));
    if let Some(site) = site {
        if !matches!(site, "same-origin" | "none") {
            return Err(format!(
                "This form was sent from another site (Sec-Fetch-Site: {site}); open the portal's page and \
                 send it from there."
            ));
        }
    }
    if let Some(sent) = headers.get(ORIGIN) {
        let sent = sent.to_str().unwrap_or("");
        let own_form = sent == "null" && site == Some("same-origin");
        if !own_form && !sent.eq_ignore_ascii_case(origin) {
            return Err(format!(
                "This form was sent from {sent:?}, not from the portal ({origin:?}); if the portal is reached \
                 at that address, set portal.public_url to it."
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_is_found_and_shaped() {
        let token = "ab".repeat(32);
        let mut headers = HeaderMap::new();
        headers.insert(
            COOKIE,
            HeaderValue::from_str(&format!("other=1; {COOKIE_NAME}={token}; x=y")).unwrap(),
        );
        assert_eq!(session_cookie(&headers), Some(token.clone()));
        headers.insert(
            COOKIE,
            HeaderValue::from_str(&format!("{COOKIE_NAME}={}", token.to_uppercase())).unwrap(),
        );
        assert_eq!(session_cookie(&headers), None);
        assert_eq!(session_cookie(&HeaderMap::new()), None);
    }

    #[test]
    fn cookie_attributes_follow_https_and_embedding() {
        let policy = |secure, embedded| CookiePolicy {
            path: "/".into(),
            secure,
            embedded,
        };
        let s = "0".repeat(64);
        assert_eq!(
            policy(false, false).set(&s, 60).to_str().unwrap(),
            format!("walhook_portal={s}; Max-Age=60; HttpOnly; Path=/; SameSite=Lax")
        );
        assert!(policy(true, false)
            .set(&s, 60)
            .to_str()
            .unwrap()
            .ends_with("SameSite=Lax; Secure"));
        assert!(policy(true, true)
            .set(&s, 60)
            .to_str()
            .unwrap()
            .ends_with("SameSite=None; Secure"));
        assert!(policy(false, true)
            .clear()
            .to_str()
            .unwrap()
            .starts_with("walhook_portal=; Max-Age=0"));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
        assert!(!same_secret("", "a"));
    }

    #[test]
    fn other_sites_are_refused() {
        let origin = "https://hooks.example.com";
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            same_origin(&h, origin)
        };
        assert!(with(&[]).is_ok());
        assert!(with(&[("origin", "https://hooks.example.com")]).is_ok());
        assert!(with(&[("sec-fetch-site", "same-origin")]).is_ok());
        assert!(with(&[("origin", "https://evil.example")]).is_err());
        assert!(with(&[("origin", "null")]).is_err());
        // what a browser sends for the portal's own forms under Referrer-Policy: no-referrer
        assert!(with(&[("origin", "null"), ("sec-fetch-site", "same-origin")]).is_ok());
        assert!(with(&[("origin", "null"), ("sec-fetch-site", "none")]).is_err());
        assert!(with(&[("origin", "null"), ("sec-fetch-site", "cross-site")]).is_err());
        assert!(with(&[
            ("origin", "https://evil.example"),
            ("sec-fetch-site", "same-origin")
        ])
        .is_err());
        assert!(with(&[("sec-fetch-site", "cross-site")]).is_err());
        assert!(with(&[("sec-fetch-site", "same-site")]).is_err());
    }
}
