//! Which connections get an access-log line: off, sampled or full, with a
//! default and per-namespace overrides (config `settings.accessLog`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Off,
    Sampled,
    #[default]
    Full,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLog {
    #[serde(default)]
    pub mode: Mode,
    /// Fraction of connections logged in `sampled` mode (0.0-1.0).
    #[serde(default = "default_rate")]
    pub sample_rate: f64,
    /// Per-namespace mode (the source pod's namespace outbound, the destination's inbound).
    #[serde(default)]
    pub namespaces: BTreeMap<String, Mode>,
}

fn default_rate() -> f64 {
    0.01
}

impl Default for AccessLog {
    fn default() -> Self {
        Self {
            mode: Mode::Full,
            sample_rate: default_rate(),
            namespaces: BTreeMap::new(),
        }
    }
}

impl AccessLog {
    /// Whether connection `id` in `namespace` is logged. Sampling hashes the
    /// id, so it is deterministic and spreads evenly without a random source.
    pub fn should_log(&self, namespace: &str, id: u64) -> bool {
        match self.namespaces.get(namespace).copied().unwrap_or(self.mode) {
            Mode::Off => false,
            Mode::Full => true,
            Mode::Sampled => {
                let h = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
                (h as f64 / (1u64 << 53) as f64) < self.sample_rate
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_namespace_overrides() {
        let mut p = AccessLog {
            mode: Mode::Sampled,
            sample_rate: 0.25,
            ..Default::default()
        };
        p.namespaces.insert("quiet".into(), Mode::Off);
        p.namespaces.insert("audit".into(), Mode::Full);
        assert!((0..100).all(|i| !p.should_log("quiet", i)));
        assert!((0..100).all(|i| p.should_log("audit", i)));
        let n = (0..10_000).filter(|i| p.should_log("default", *i)).count();
        assert!((2_000..3_000).contains(&n), "~25% sampled, got {n}");
    }
}
