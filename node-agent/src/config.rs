//! What the agent offers: capabilities, published vars, labels and env,
//! from flags, the config file and drop-ins (`DIR/capabilities.d/*.yaml`,
//! so a test package can install one). Later sources add to earlier ones;
//! for vars, labels and env a later source wins.
use anyhow::{bail, Context};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub capabilities: Vec<String>,
    pub vars: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
}

/// The merged view.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Offer {
    pub capabilities: BTreeSet<String>,
    pub vars: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
}

impl Offer {
    pub fn add(&mut self, c: AgentConfig) {
        self.capabilities.extend(c.capabilities);
        self.vars.extend(c.vars);
        self.labels.extend(c.labels);
        self.env.extend(c.env);
    }
}

pub fn parse_file(path: &Path) -> anyhow::Result<AgentConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if text.trim().is_empty() {
        return Ok(AgentConfig::default());
    }
    serde_norway::from_str(&text).with_context(|| format!("{}: invalid agent config", path.display()))
}

/// Drop-ins in name order.
pub fn drop_ins(dir: &Path) -> anyhow::Result<Vec<AgentConfig>> {
    let d = dir.join("capabilities.d");
    let rd = match std::fs::read_dir(&d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("reading {}", d.display())),
    };
    let mut paths: Vec<_> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    paths.sort();
    paths.iter().map(|p| parse_file(p)).collect()
}

/// `K=V` from the command line.
pub fn parse_kv(flag: &str, s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => bail!("{flag} {s:?}: expected KEY=VALUE"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_ins_merge_in_order_and_reject_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("capabilities.d");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("10-nfs.yaml"), "capabilities: [nfs-server]\nvars: {port: \"1\"}\n").unwrap();
        std::fs::write(d.join("20-more.yaml"), "capabilities: [nfs-client]\nvars: {port: \"2\"}\n").unwrap();
        std::fs::write(d.join("ignored.txt"), "garbage").unwrap();
        let mut offer = Offer::default();
        for c in drop_ins(dir.path()).unwrap() {
            offer.add(c);
        }
        assert_eq!(offer.capabilities.iter().collect::<Vec<_>>(), ["nfs-client", "nfs-server"]);
        assert_eq!(offer.vars["port"], "2");
        std::fs::write(d.join("30-bad.yaml"), "capabilites: [typo]\n").unwrap();
        let err = format!("{:#}", drop_ins(dir.path()).unwrap_err());
        assert!(err.contains("30-bad.yaml") && err.contains("capabilites"), "{err}");
    }
}
