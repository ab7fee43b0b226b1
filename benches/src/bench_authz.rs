//! The cost of authorization decisions (issue 14): Istio
//! `AuthorizationPolicy` evaluation with 10,000 policies in the config, as
//! the destination agent does it (`State::authz_for` picks the policies that
//! apply to the destination pod once per snapshot; `authz::evaluate` runs per
//! connection, and per request on HTTP ports). Pure CPU, no box: the figures
//! are nanoseconds per decision and the time to build a snapshot.
//!
//! Cases, each timed over many decisions after a warm-up:
//! - **typical**: 10,000 policies over 100 namespaces; the pod has 100
//!   applicable ALLOW policies (its namespace's), the caller matches the last;
//! - **denied**: same policies, a caller no rule admits (every rule scanned);
//! - **mesh-wide worst case**: all 10,000 policies in the root namespace, so
//!   every one applies to every pod; the caller matches none (full scan);
//! - **L7**: the typical case with HTTP attributes (methods and paths), as
//!   on an HTTP port per request.
//!
//! And the cost on the data path, on the box ([`datapath`]): a client opens
//! a new mTLS connection per 1-byte round trip to a pod on the other node
//! (`ferry-workload rr --new-conn`), with no policy, then with 100 ALLOW
//! policies applying to the server (the caller admitted by the last), then
//! with a DENY that matches nobody besides them; connections per second
//! and latency percentiles side by side.

use std::{
    fmt::Write as _,
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Instant,
};

use anyhow::{Context, Result};
use ferry_model::{
    authz::{evaluate, HttpAttrs, Request, Verdict},
    state::State,
    ConfigFile,
};
use serde::Serialize;

pub struct Sizes {
    pub policies: usize,
    pub namespaces: usize,
    /// Decisions timed per case.
    pub decisions: u32,
    /// New connections per data-path case (0: no box run).
    pub connections: usize,
}

pub const FULL: Sizes = Sizes {
    policies: 10_000,
    namespaces: 100,
    decisions: 200_000,
    connections: 3_000,
};
pub const QUICK: Sizes = Sizes {
    policies: 1_000,
    namespaces: 10,
    decisions: 5_000,
    connections: 300,
};

#[derive(Serialize)]
pub struct Row {
    pub case: &'static str,
    pub applicable_policies: usize,
    pub verdict: String,
    pub ns_per_decision: f64,
}

#[derive(Serialize)]
pub struct Report {
    pub policies: usize,
    pub snapshot_build_ms: f64,
    pub rows: Vec<Row>,
    /// Per connection on the box (empty when not run).
    pub datapath: Vec<DatapathRow>,
}

/// One data-path case: new connections, cross-node, mTLS.
#[derive(Serialize)]
pub struct DatapathRow {
    pub case: &'static str,
    pub policies: usize,
    pub connections: u64,
    pub conns_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// `count` ALLOW policies spread over `namespaces` (or all in the root
/// namespace), each admitting one service account, optionally on GET
/// /api/<i> only.
fn config(count: usize, namespaces: usize, root: bool, l7: bool) -> String {
    let mut y = String::from(
        "node: n1\nworkloads:\n  - {uid: dst, name: dst, namespace: ns0, node: n1, ip: 10.1.0.2, enrolled: true, labels: {app: dst}}\nauthorizationPolicies:\n",
    );
    for i in 0..count {
        let ns = if root {
            "istio-system".to_owned()
        } else {
            format!("ns{}", i % namespaces)
        };
        let to = if l7 {
            format!(", to: [{{operation: {{methods: [GET], paths: [/api/{i}/*]}}}}]")
        } else {
            String::new()
        };
        let _ = writeln!(
            y,
            "  - {{name: p{i}, namespace: {ns}, spec: {{rules: [{{from: [{{source: {{principals: [cluster.local/ns/{ns}/sa/caller-{i}]}}}}]{to}}}]}}}}"
        );
    }
    y
}

fn time_decisions(state: &State, req: &Request<'_>, n: u32) -> (usize, String, f64) {
    let dst = state
        .workloads
        .get("dst")
        .expect("the destination pod is in the config");
    let policies = state.authz_for(dst);
    let refs: Vec<_> = policies.iter().map(|p| &**p).collect();
    let verdict = match evaluate(&refs, req).verdict {
        Verdict::Allow { .. } => "allow".to_owned(),
        Verdict::Deny { reason, .. } => format!("deny ({})", reason.as_str()),
    };
    for _ in 0..n / 10 {
        black_box(evaluate(black_box(&refs), black_box(req)));
    }
    let t = Instant::now();
    for _ in 0..n {
        black_box(evaluate(black_box(&refs), black_box(req)));
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(n);
    (refs.len(), verdict, ns)
}

struct NoHeaders;
impl ferry_model::authz::Headers for NoHeaders {
    fn get(&self, _name: &str) -> Option<&str> {
        None
    }
}

/// The AuthorizationPolicies of a data-path case, as cluster YAML: `allows`
/// ALLOW policies on the echo pods, the client's identity admitted by the
/// last; with `deny`, a DENY matching another identity too.
fn datapath_policies(allows: usize, deny: bool) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..allows {
        let sa = if i + 1 == allows {
            "client".to_owned()
        } else {
            format!("caller-{i}")
        };
        out.push((
            format!("authz-allow-{i}.yaml"),
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-{i}, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: echo}}}}\n  action: ALLOW\n  rules: [{{from: [{{source: {{principals: [cluster.local/ns/default/sa/{sa}]}}}}]}}]\n"
            ),
        ));
    }
    if deny {
        out.push((
            "authz-deny.yaml".into(),
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-one, namespace: default}\nspec:\n  selector: {matchLabels: {app: echo}}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/intruder]}}]}]\n".into(),
        ));
    }
    out
}

/// Per-connection cost on the box: `n` new connections (one 1-byte round
/// trip each) from `client` (node 1) to the echo Service with its endpoint
/// on node 2, per policy case.
pub fn datapath(n: usize, bins: &Path) -> Result<Vec<DatapathRow>> {
    use ferry_box::{ClusterBox, Spec};
    let mut spec = Spec::demo();
    spec.services[0].endpoints = vec!["echo-2".into()];
    spec.mtls = true;
    spec.discovery = true;
    spec.access_log.mode = ferry_model::access_log::Mode::Off;
    let mut b = ClusterBox::up(spec, bins.to_owned())?;
    let mut rows = Vec::new();
    for (case, allows, deny) in [
        ("no policy", 0, false),
        ("100 ALLOW policies, caller admitted by the last", 100, false),
        ("the same plus a DENY for another identity", 100, true),
    ] {
        let policies = datapath_policies(allows, deny);
        // An update must change the cluster (it waits for the new version).
        if !policies.is_empty() {
            b.update(|sp| {
                sp.cluster_yaml.retain(|(name, _)| !name.starts_with("authz-"));
                sp.cluster_yaml.extend(policies);
            })?;
        }
        // Warm-up (certificates, tunnel pool, ARP).
        b.state.client(
            "client",
            &["rr", "--to", "10.96.0.10:80", "--count", "50", "--new-conn"],
        )?;
        let out = b.state.client(
            "client",
            &["rr", "--to", "10.96.0.10:80", "--count", &n.to_string(), "--new-conn"],
        )?;
        let v: serde_json::Value = serde_json::from_str(out.trim()).context("rr output")?;
        rows.push(DatapathRow {
            case,
            policies: allows + usize::from(deny),
            connections: v["count"].as_u64().unwrap_or(0),
            conns_per_s: v["ops_per_s"].as_f64().unwrap_or(f64::NAN),
            p50_us: v["p50_us"].as_f64().unwrap_or(f64::NAN),
            p99_us: v["p99_us"].as_f64().unwrap_or(f64::NAN),
        });
    }
    Ok(rows)
}

pub fn bench(sizes: Sizes, bins: &Path, out: &Path) -> Result<Report> {
    let parse = |text: String| -> Result<State> {
        let cfg = ConfigFile::parse("bench", &text).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(State::from_config(cfg, 1))
    };
    let per_ns = sizes.policies / sizes.namespaces;
    // The last policy of ns0 admits this caller.
    let last = (per_ns - 1) * sizes.namespaces;
    let allowed = format!("spiffe://cluster.local/ns/ns0/sa/caller-{last}");
    let req = |principal: &'static str, http: Option<HttpAttrs<'static>>| Request {
        source_principal: Some(principal),
        source_namespace: Some("ns0"),
        source_ip: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 9)),
        destination_ip: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2)),
        destination_port: 9080,
        sni: None,
        http,
    };
    let allowed: &'static str = Box::leak(allowed.into_boxed_str());
    let path: &'static str = Box::leak(format!("/api/{last}/items").into_boxed_str());
    let nobody = "spiffe://cluster.local/ns/ns0/sa/nobody";
    let mut rows = Vec::new();

    let t = Instant::now();
    let typical = parse(config(sizes.policies, sizes.namespaces, false, false))?;
    let snapshot_build_ms = t.elapsed().as_secs_f64() * 1e3;
    for (case, principal) in [
        ("typical: caller admitted by the last policy", allowed),
        ("denied: no rule admits the caller", nobody),
    ] {
        let (n, verdict, ns) = time_decisions(&typical, &req(principal, None), sizes.decisions);
        rows.push(Row {
            case,
            applicable_policies: n,
            verdict,
            ns_per_decision: ns,
        });
    }
    let l7 = parse(config(sizes.policies, sizes.namespaces, false, true))?;
    let http = HttpAttrs {
        method: "GET",
        path,
        host: "dst.ns0:9080",
        headers: &NoHeaders,
    };
    let (n, verdict, ns) = time_decisions(&l7, &req(allowed, Some(http)), sizes.decisions);
    rows.push(Row {
        case: "L7 per request: GET on the last policy's path",
        applicable_policies: n,
        verdict,
        ns_per_decision: ns,
    });
    let root = parse(config(sizes.policies, sizes.namespaces, true, false))?;
    let (n, verdict, ns) = time_decisions(&root, &req(nobody, None), (sizes.decisions / 20).max(100));
    rows.push(Row {
        case: "mesh-wide worst case: every policy applies, none admits",
        applicable_policies: n,
        verdict,
        ns_per_decision: ns,
    });

    let datapath = if sizes.connections > 0 {
        datapath(sizes.connections, bins)?
    } else {
        Vec::new()
    };
    let report = Report {
        policies: sizes.policies,
        snapshot_build_ms,
        rows,
        datapath,
    };
    write(&report, out)?;
    Ok(report)
}

fn write(r: &Report, out: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(r)?;
    std::fs::write(out.with_extension("json"), json).with_context(|| format!("writing {}", out.display()))?;
    let mut md = format!(
        "# Authorization: decision cost\n\n\
         `ferry-bench bench --only authz`, also run by `cargo xtask bench` (`benches/src/bench_authz.rs`): {} `AuthorizationPolicy` objects in one\n\
         agent config, evaluated by `ferry_model::authz::evaluate` over the policies `State::authz_for` found for the\n\
         destination pod (once per snapshot). Pure CPU, one core, this machine.\n\n\
         Building the snapshot (parse, validate, per-pod policy index): {:.1} ms.\n\n\
         | case | applicable policies | verdict | ns per decision |\n|---|---|---|---|\n",
        r.policies, r.snapshot_build_ms
    );
    for row in &r.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} |",
            row.case, row.applicable_policies, row.verdict, row.ns_per_decision
        );
    }
    md.push_str(
        "\nA decision is made once per connection on TCP ports and once per request on HTTP ports. ztunnel's\n\
         `rbac` benchmark measures the same kind of decision; compare orders of magnitude, not digits.\n",
    );
    if !r.datapath.is_empty() {
        md.push_str(
            "\n## Per connection, on the data path\n\n\
             On the cluster-in-a-box: the client pod (node 1) opens a new connection per 1-byte round trip to the\n\
             echo Service, whose one endpoint is on node 2 (mTLS tunnel; the destination agent decides). Policies\n\
             are streamed by ferry-control and apply to the echo pod. One run, back to back, this 2-core VM.\n\n\
             | case | policies | connections | conns/s | p50 µs | p99 µs |\n|---|---|---|---|---|---|\n",
        );
        for d in &r.datapath {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} |",
                d.case, d.policies, d.connections, d.conns_per_s, d.p50_us, d.p99_us
            );
        }
        if let (Some(typical), Some(none)) = (r.rows.first(), r.datapath.first()) {
            let _ = writeln!(
                md,
                "\nThe decision with 100 applicable policies costs {:.1} µs (above) of a new connection's {:.0} µs (p50,\n\
                 no policy): {:.2} %. Differences between these rows beyond that are run-to-run noise on this shared VM.",
                typical.ns_per_decision / 1e3,
                none.p50_us,
                typical.ns_per_decision / 1e3 / none.p50_us * 100.0
            );
        }
    }
    std::fs::write(out.with_extension("md"), md).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
