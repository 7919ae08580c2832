//! API tokens: each names an owner, who sees only the jobs submitted with a token of theirs; an
//! admin token sees every job. A request carries its token as `Authorization: Bearer TOKEN` or
//! as `?token=TOKEN` (for browsers' websockets and `<img>` tags).

use std::collections::HashMap;

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub owner: String,
    pub admin: bool,
}

impl Caller {
    /// Whether this caller may see a job of `owner`.
    pub fn sees(&self, owner: &str) -> bool {
        self.admin || self.owner == owner
    }
}

/// The server's tokens.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_secret: HashMap<String, Caller>,
}

impl Tokens {
    /// Parses `--token OWNER:SECRET` values (`admin` tokens from `--admin-token SECRET`).
    pub fn parse(users: &[String], admins: &[String]) -> Result<Tokens, String> {
        let mut t = Tokens::default();
        for spec in users {
            let (owner, secret) = spec
                .split_once(':')
                .filter(|(o, s)| !o.is_empty() && !s.is_empty())
                .ok_or_else(|| format!("--token '{spec}': expected OWNER:SECRET"))?;
            t.add(secret, owner, false)?;
        }
        for secret in admins {
            if secret.is_empty() {
                return Err("--admin-token: empty".into());
            }
            t.add(secret, "admin", true)?;
        }
        Ok(t)
    }

    fn add(&mut self, secret: &str, owner: &str, admin: bool) -> Result<(), String> {
        if secret.len() < 8 {
            return Err(format!(
                "the token for '{owner}' is {} characters; use at least 8",
                secret.len()
            ));
        }
        let caller = Caller {
            owner: owner.to_string(),
            admin,
        };
        if self.by_secret.insert(secret.to_string(), caller).is_some() {
            return Err(format!("the token for '{owner}' is given twice"));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.by_secret.is_empty()
    }

    /// The caller whose token is `secret`, compared in time independent of where it differs.
    pub fn caller(&self, secret: &str) -> Option<Caller> {
        self.by_secret
            .iter()
            .find(|(s, _)| constant_time_eq(s.as_bytes(), secret.as_bytes()))
            .map(|(_, c)| c.clone())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of a request: its bearer token, else its `token` query parameter.
pub fn token_of<'a>(authorization: Option<&'a str>, query: Option<&'a str>) -> Option<&'a str> {
    if let Some(t) = authorization.and_then(|h| h.strip_prefix("Bearer ")) {
        return Some(t.trim());
    }
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_owners_and_bad_specs_say_why() {
        let t = Tokens::parse(&["alice:alice-secret-1".into()], &["root-secret-1".into()]).unwrap();
        let alice = t.caller("alice-secret-1").unwrap();
        assert_eq!(alice.owner, "alice");
        assert!(alice.sees("alice") && !alice.sees("bob"));
        assert!(t.caller("root-secret-1").unwrap().sees("bob"));
        assert_eq!(t.caller("alice-secret-2"), None);
        assert!(Tokens::parse(&["nobody".into()], &[])
            .unwrap_err()
            .contains("OWNER:SECRET"));
        assert!(Tokens::parse(&["a:short".into()], &[])
            .unwrap_err()
            .contains("at least 8"));
        assert_eq!(token_of(Some("Bearer abc"), None), Some("abc"));
        assert_eq!(token_of(None, Some("x=1&token=def")), Some("def"));
        assert_eq!(token_of(None, Some("token=")), None);
    }
}
