//! `${NAME}` substitution in argv, done by the agent just before exec from
//! the process's final environment. `$$` is a literal `$`; an unknown name is
//! an error naming the variable, never an empty string.
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubstError {
    #[error("unknown variable ${{{0}}}")]
    Unknown(String),
    #[error("unterminated ${{ in {0:?}")]
    Unterminated(String),
    #[error("invalid variable name {0:?} in ${{...}}")]
    BadName(String),
}

/// Where substitution finds a variable's value.
pub trait Lookup {
    fn lookup(&self, name: &str) -> Option<&str>;
}

impl Lookup for BTreeMap<String, String> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

pub fn substitute(input: &str, env: &impl Lookup) -> Result<String, SubstError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| SubstError::Unterminated(input.to_string()))?;
            let name = &r[..end];
            if crate::validate::env_name(name).is_err() {
                return Err(SubstError::BadName(name.to_string()));
            }
            let v = env.lookup(name).ok_or_else(|| SubstError::Unknown(name.to_string()))?;
            out.push_str(v);
            rest = &r[end + 1..];
        } else {
            // `$X` without braces is left alone: it may be meant for a shell.
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// `host_<role>_<var>` with characters outside [A-Za-z0-9_] mapped to `_`.
pub fn host_var_name(role: &str, var: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
    };
    format!("host_{}_{}", clean(role), clean(var))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> BTreeMap<String, String> {
        [("A".to_string(), "1".to_string()), ("host_server_ipv4addr".into(), "10.0.0.1".into())].into()
    }

    #[test]
    fn substitutes_and_escapes() {
        assert_eq!(substitute("${host_server_ipv4addr}:${A}", &env()).unwrap(), "10.0.0.1:1");
        assert_eq!(substitute("$${A} costs $5 $", &env()).unwrap(), "${A} costs $5 $");
        assert_eq!(substitute("plain", &env()).unwrap(), "plain");
    }

    #[test]
    fn unknown_names_fail_with_the_name() {
        let e = substitute("x${NOPE}y", &env()).unwrap_err();
        assert_eq!(e, SubstError::Unknown("NOPE".into()));
        assert!(e.to_string().contains("NOPE"));
        assert!(matches!(substitute("${A", &env()), Err(SubstError::Unterminated(_))));
        assert!(matches!(substitute("${a-b}", &env()), Err(SubstError::BadName(_))));
    }

    #[test]
    fn host_var_names_are_mapped() {
        assert_eq!(host_var_name("nfs-server", "ipv4addr"), "host_nfs_server_ipv4addr");
        assert_eq!(host_var_name("client0", "my.var"), "host_client0_my_var");
    }
}
