//! Load balancers under load (issue 13), on the cluster-in-a-box: Service
//! `lb` with three HTTP endpoints (`tests/fixtures/balancing`, lb-d taken
//! out of the Service), called from `lb-client` with `ferry-workload http
//! client` (bounded request count, fixed concurrency), one DestinationRule
//! per case applied live through ferry-control.
//!
//! Two tables:
//! - **cost**: every endpoint healthy; latency and throughput per balancer
//!   (ROUND_ROBIN, LEAST_REQUEST, RANDOM, consistent hash on a header with
//!   ring hash and with Maglev): what choosing costs on the request path;
//! - **one slow endpoint of three** (`x-delay-on: lb-c=<ms>`): the share
//!   the slow endpoint gets and the tail latency, round robin vs the
//!   others. This is the figure that shows why P2C matters.

use std::{fmt::Write as _, path::Path, time::Instant};

use anyhow::{Context, Result};
use ferry_box::{manifests, ClusterBox};
use serde::Serialize;
use serde_json::Value;

const URL: &str = "http://10.96.0.40:80/";
const CLIENT: &str = "lb-client";

pub struct Sizes {
    pub requests: u64,
    pub concurrency: u64,
    pub slow_ms: u64,
}

pub const FULL: Sizes = Sizes {
    requests: 5_000,
    concurrency: 8,
    slow_ms: 50,
};
pub const QUICK: Sizes = Sizes {
    requests: 300,
    concurrency: 8,
    slow_ms: 50,
};

#[derive(Serialize)]
pub struct Row {
    pub balancer: &'static str,
    pub slow_endpoint: bool,
    pub requests: u64,
    pub ok: u64,
    pub req_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Share of the answers from the slow endpoint (lb-c).
    pub slow_share: f64,
}

#[derive(Serialize)]
pub struct Report {
    pub requests: u64,
    pub concurrency: u64,
    pub slow_ms: u64,
    pub rows: Vec<Row>,
}

const BALANCERS: [(&str, &str); 5] = [
    ("ROUND_ROBIN", "    loadBalancer: {simple: ROUND_ROBIN}\n"),
    ("LEAST_REQUEST", "    loadBalancer: {simple: LEAST_REQUEST}\n"),
    ("RANDOM", "    loadBalancer: {simple: RANDOM}\n"),
    (
        "ring hash (header)",
        "    loadBalancer: {consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 1024}}}\n",
    ),
    (
        "Maglev (header)",
        "    loadBalancer: {consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}}\n",
    ),
];

fn rule(policy: &str) -> (String, String) {
    (
        "lb-rule.yaml".into(),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: lb}}\nspec:\n  host: lb\n  trafficPolicy:\n{policy}"
        ),
    )
}

pub fn bench(sizes: Sizes, bins: &Path, out: &Path) -> Result<Report> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/balancing");
    let mut spec = manifests::spec_from_dir(&dir, 2)?;
    // Three endpoints: lb-d leaves the Service (its `app` label changes).
    let spare = spec
        .pods
        .iter_mut()
        .find(|p| p.name == "lb-d")
        .context("the balancing fixture changed: no pod lb-d")?;
    for (k, v) in &mut spare.labels {
        if k == "app" {
            *v = "lb-spare".into();
        }
    }
    let base = spec.cluster_yaml.clone();
    let mut b = ClusterBox::up(spec, bins.to_owned())?;
    let (n, c) = (sizes.requests.to_string(), sizes.concurrency.to_string());
    let slow = format!("x-delay-on:lb-c={}", sizes.slow_ms);
    let mut rows = Vec::new();
    for (name, policy) in BALANCERS {
        let mut y = base.clone();
        y.push(rule(policy));
        b.update(|sp| sp.cluster_yaml = y)?;
        for slow_endpoint in [false, true] {
            // Keys spread consistent hashing over the endpoints.
            let mut args = vec!["--url", URL, "--count", &n, "--concurrency", &c, "--keys", "64"];
            args.extend(["--header", "x-user: u{k}"]);
            if slow_endpoint {
                args.extend(["--header", &slow]);
            }
            // Warm-up: pools, certificates.
            b.state
                .http_client(CLIENT, &["--url", URL, "--count", "50", "--concurrency", &c])?;
            let t = Instant::now();
            let v: Value = b.state.http_client(CLIENT, &args)?;
            let secs = t.elapsed().as_secs_f64();
            let ok = v["by_status"]["200"].as_u64().unwrap_or(0);
            let on_slow = v["by_pod"]["lb-c"].as_u64().unwrap_or(0);
            let elapsed = v["elapsed_ms"].as_f64().map_or(secs, |ms| ms / 1e3).max(1e-3);
            rows.push(Row {
                balancer: name,
                slow_endpoint,
                requests: sizes.requests,
                ok,
                req_per_s: ok as f64 / elapsed,
                p50_ms: v["p50_ms"].as_f64().unwrap_or(f64::NAN),
                p99_ms: v["p99_ms"].as_f64().unwrap_or(f64::NAN),
                max_ms: v["max_ms"].as_f64().unwrap_or(f64::NAN),
                slow_share: on_slow as f64 / (ok.max(1)) as f64,
            });
            eprintln!("{name} slow={slow_endpoint}: {v}");
        }
    }
    let report = Report {
        requests: sizes.requests,
        concurrency: sizes.concurrency,
        slow_ms: sizes.slow_ms,
        rows,
    };
    write(&report, out)?;
    Ok(report)
}

fn write(r: &Report, out: &Path) -> Result<()> {
    std::fs::write(out.with_extension("json"), serde_json::to_string_pretty(r)?)
        .with_context(|| format!("writing {}", out.display()))?;
    let mut md = format!(
        "# Load balancers under load\n\n\
         `ferry-bench bench --only lb` (`benches/src/bench_lb.rs`), on the cluster-in-a-box: Service `lb` with three\n\
         HTTP endpoints (one on the client's node, two on the other), {} requests per case from one client pod,\n\
         {} at a time (`ferry-workload http client`, keys `x-user: u0..u63`), one DestinationRule per balancer applied\n\
         live. One run, back to back, this 2-core VM shared by the client, the servers and both agents.\n\n\
         ## Every endpoint healthy: what choosing costs\n\n\
         | balancer | ok | req/s | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|\n",
        r.requests, r.concurrency
    );
    for row in r.rows.iter().filter(|x| !x.slow_endpoint) {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} |",
            row.balancer, row.ok, row.req_per_s, row.p50_ms, row.p99_ms, row.max_ms
        );
    }
    let _ = write!(
        md,
        "\n## One slow endpoint of three (lb-c answers {} ms late)\n\n\
         | balancer | share to the slow endpoint | req/s | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|\n",
        r.slow_ms
    );
    for row in r.rows.iter().filter(|x| x.slow_endpoint) {
        let _ = writeln!(
            md,
            "| {} | {:.1} % | {:.0} | {:.2} | {:.2} | {:.2} |",
            row.balancer,
            row.slow_share * 100.0,
            row.req_per_s,
            row.p50_ms,
            row.p99_ms,
            row.max_ms
        );
    }
    md.push_str(
        "\nRound robin and random give the slow endpoint its third whatever it does; least request (power of two\n\
         choices on in-flight requests) sends it less as its requests pile up. Consistent hashing keeps each key on\n\
         its endpoint by design, slow or not: the keys that hash to the slow endpoint stay slow.\n",
    );
    std::fs::write(out.with_extension("md"), md).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
