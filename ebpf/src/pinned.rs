//! Read-only access to a node's pinned maps (ferryctl; works with the agent
//! down), decoded with the same layout types the agent uses.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use serde::Serialize;

use crate::maps::{self, Dst, DstKey, OrigDst, Pod, SockKey, Traffic};

#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    #[error("no Ferry maps at {0} (is the agent for this node running, and is bpffs mounted at /sys/fs/bpf?)")]
    NotFound(PathBuf),
    #[error("reading pinned map {name}: {source} (reading BPF maps needs root)")]
    Map { name: String, source: aya::maps::MapError },
}

pub struct Pinned {
    dir: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct MapRow {
    pub name: String,
    pub kind: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// Entries in use (None where the kernel cannot list them: arrays, ring buffer).
    pub entries: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct PodRow {
    pub netns_cookie: u64,
    pub pod_id: u32,
}

#[derive(Debug, Serialize)]
pub struct DstRow {
    pub ip: Ipv4Addr,
    /// 0 = any port (an enrolled pod).
    pub port: u16,
    pub kind: &'static str,
}

#[derive(Debug, Serialize)]
pub struct InboundPolicyRow {
    pub ip: Ipv4Addr,
    /// `strict` (no listener: refused), `permissive` (no listener: to the
    /// app), `none`.
    pub mode: &'static str,
}

#[derive(Debug, Serialize)]
pub struct OrigDstRow {
    pub netns_cookie: u64,
    pub client: String,
    pub agent: String,
    pub orig_dst: String,
    pub pod_id: u32,
}

#[derive(Debug, Serialize)]
pub struct TrafficRow {
    pub ifindex: u32,
    /// The interface's name in the caller's netns (the node's), if it exists.
    pub interface: Option<String>,
    #[serde(flatten)]
    pub traffic: Traffic,
}

#[derive(Debug, Serialize)]
pub struct ProgRow {
    /// The pod UID the attachment belongs to, or `agent`.
    pub owner: String,
    pub hook: String,
    pub link_id: u32,
    pub prog_id: u32,
    pub program: String,
    /// Runs and time spent, counted only while `kernel.bpf_stats_enabled=1`.
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl Pinned {
    pub fn open(pin_root: &Path, node: &str) -> Result<Self, PinnedError> {
        let dir = pin_root.join(node);
        if !dir.join("ferry_config").exists() {
            return Err(PinnedError::NotFound(dir));
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn map(&self, name: &str) -> Result<Map, PinnedError> {
        let err = |source| PinnedError::Map {
            name: name.to_owned(),
            source,
        };
        let data = MapData::from_pin(self.dir.join(name)).map_err(err)?;
        Map::from_map_data(data).map_err(err)
    }

    fn err(name: &str) -> impl FnOnce(aya::maps::MapError) -> PinnedError + '_ {
        move |source| PinnedError::Map {
            name: name.to_owned(),
            source,
        }
    }

    pub fn maps(&self) -> Result<Vec<MapRow>, PinnedError> {
        let mut rows = Vec::new();
        for &name in maps::MAP_NAMES {
            let data = MapData::from_pin(self.dir.join(name)).map_err(Self::err(name))?;
            let info = data.info().map_err(Self::err(name))?;
            let kind = info
                .map_type()
                .map(|t| format!("{t:?}"))
                .unwrap_or_else(|_| "unknown".into());
            let entries = match name {
                "ferry_pods" => Some(self.pods()?.len()),
                "ferry_mesh_dst" => Some(self.mesh_dst()?.len()),
                "ferry_orig_dst" => Some(self.orig_dst()?.len()),
                "ferry_traffic" => Some(self.traffic()?.len()),
                "ferry_orig_cookie" => Some(count_keys_of::<u64, OrigDst>(self.map(name)?)),
                "ferry_splice_off" => Some(count_keys_of::<SockKey, u32>(self.map(name)?)),
                "ferry_delivery" => Some(count_keys_of::<maps::DeliveryKey, maps::Delivery>(self.map(name)?)),
                "ferry_inbound" => Some(sockhash_len::<maps::InboundKey>(self.map(name)?)),
                "ferry_inbound_policy" => Some(self.inbound_policy()?.len()),
                "ferry_splice" => Some(sockhash_len::<SockKey>(self.map(name)?)),
                _ => None,
            };
            rows.push(MapRow {
                name: name.to_owned(),
                kind,
                key_size: info.key_size(),
                value_size: info.value_size(),
                max_entries: info.max_entries(),
                entries,
            });
        }
        Ok(rows)
    }

    /// Every pinned attachment (links/<owner>/<hook>) with its program.
    /// (`ferry_sk_msg` is attached to the `ferry_splice` map, not by a link.)
    pub fn progs(&self) -> Result<Vec<ProgRow>, PinnedError> {
        let progs: std::collections::HashMap<u32, aya::programs::ProgramInfo> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| (p.id(), p))
            .collect();
        let mut rows = Vec::new();
        let owners = std::fs::read_dir(self.dir.join("links")).map_err(|_| PinnedError::NotFound(self.dir.clone()))?;
        for owner in owners.flatten() {
            for hook in std::fs::read_dir(owner.path()).into_iter().flatten().flatten() {
                let Ok(link) = aya::programs::links::PinnedLink::from_pin(hook.path()) else {
                    continue;
                };
                let link: aya::programs::links::FdLink = link.into();
                let Ok(info) = link.info() else { continue };
                let prog = progs.get(&info.program_id());
                rows.push(ProgRow {
                    owner: owner.file_name().to_string_lossy().into_owned(),
                    hook: hook.file_name().to_string_lossy().into_owned(),
                    link_id: info.id(),
                    prog_id: info.program_id(),
                    program: prog.and_then(|p| p.name_as_str()).unwrap_or("?").to_owned(),
                    run_count: prog.map_or(0, |p| p.run_count()),
                    run_time_ns: prog.map_or(0, |p| p.run_time().as_nanos() as u64),
                });
                // Dropping `link` closes our fd only: the pin keeps it attached.
            }
        }
        rows.sort_by(|a, b| (&a.owner, &a.hook).cmp(&(&b.owner, &b.hook)));
        Ok(rows)
    }

    pub fn config(&self) -> Result<maps::Config, PinnedError> {
        let a: Array<_, maps::Config> =
            Array::try_from(self.map("ferry_config")?).map_err(Self::err("ferry_config"))?;
        a.get(&0, 0).map_err(Self::err("ferry_config"))
    }

    pub fn pods(&self) -> Result<Vec<PodRow>, PinnedError> {
        let m: HashMap<_, u64, Pod> = HashMap::try_from(self.map("ferry_pods")?).map_err(Self::err("ferry_pods"))?;
        Ok(m.iter()
            .filter_map(Result::ok)
            .map(|(k, v)| PodRow {
                netns_cookie: k,
                pod_id: v.pod_id,
            })
            .collect())
    }

    /// `ferry_inbound_policy`: each captured pod's IP and what `sk_lookup`
    /// does for it while its inbound listener is missing.
    pub fn inbound_policy(&self) -> Result<Vec<InboundPolicyRow>, PinnedError> {
        let name = "ferry_inbound_policy";
        let m: HashMap<_, maps::InboundKey, maps::InboundPolicy> =
            HashMap::try_from(self.map(name)?).map_err(Self::err(name))?;
        let mut v: Vec<_> = m
            .iter()
            .filter_map(Result::ok)
            .map(|(k, p)| InboundPolicyRow {
                ip: k.ip(),
                mode: match p.mode {
                    maps::INBOUND_STRICT => "strict",
                    maps::INBOUND_PERMISSIVE => "permissive",
                    maps::INBOUND_NONE => "none",
                    _ => "unknown",
                },
            })
            .collect();
        v.sort_by_key(|r| r.ip);
        Ok(v)
    }

    pub fn mesh_dst(&self) -> Result<Vec<DstRow>, PinnedError> {
        let m: HashMap<_, DstKey, Dst> =
            HashMap::try_from(self.map("ferry_mesh_dst")?).map_err(Self::err("ferry_mesh_dst"))?;
        let mut v: Vec<_> = m
            .iter()
            .filter_map(Result::ok)
            .map(|(k, d)| DstRow {
                ip: k.ip(),
                port: k.port,
                kind: if d.kind == maps::DST_SERVICE { "service" } else { "pod" },
            })
            .collect();
        v.sort_by_key(|r| (r.ip, r.port));
        Ok(v)
    }

    pub fn orig_dst(&self) -> Result<Vec<OrigDstRow>, PinnedError> {
        let m: HashMap<_, SockKey, OrigDst> =
            HashMap::try_from(self.map("ferry_orig_dst")?).map_err(Self::err("ferry_orig_dst"))?;
        Ok(m.iter()
            .filter_map(Result::ok)
            .map(|(k, v)| OrigDstRow {
                netns_cookie: k.netns_cookie,
                client: k.local().to_string(),
                agent: k.remote().to_string(),
                orig_dst: v.addr().to_string(),
                pod_id: v.pod_id,
            })
            .collect())
    }

    pub fn traffic(&self) -> Result<Vec<TrafficRow>, PinnedError> {
        let m: PerCpuHashMap<_, u32, Traffic> =
            PerCpuHashMap::try_from(self.map("ferry_traffic")?).map_err(Self::err("ferry_traffic"))?;
        let mut v: Vec<_> = m
            .iter()
            .filter_map(Result::ok)
            .map(|(ifindex, per_cpu)| {
                let mut t = Traffic::default();
                per_cpu.iter().for_each(|c| t += *c);
                TrafficRow {
                    ifindex,
                    interface: if_name(ifindex),
                    traffic: t,
                }
            })
            .collect();
        v.sort_by_key(|r| r.ifindex);
        Ok(v)
    }

    /// The eBPF-side counters, summed over CPUs, by name.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, PinnedError> {
        let a: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map("ferry_stats")?).map_err(Self::err("ferry_stats"))?;
        maps::STAT_NAMES
            .iter()
            .map(|&(i, name)| Ok((name, a.get(&i, 0).map_err(Self::err("ferry_stats"))?.iter().sum())))
            .collect()
    }
}

fn if_name(ifindex: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes, NUL included, into buf.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

fn count_keys_of<K: aya::Pod, V: aya::Pod>(m: Map) -> usize {
    HashMap::<MapData, K, V>::try_from(m)
        .map(|h| h.keys().count())
        .unwrap_or(0)
}

/// Sockets in a sockhash (its occupancy).
fn sockhash_len<K: aya::Pod>(m: Map) -> usize {
    aya::maps::SockHash::<MapData, K>::try_from(m)
        .map(|h| h.keys().count())
        .unwrap_or(0)
}
