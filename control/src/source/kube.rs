//! The Kubernetes source: one kube-rs watcher per kind (list, then watch from
//! the list's resourceVersion, relisting when the watch expires with 410
//! Gone, with backoff on errors), all feeding one object store. Each object
//! goes through the same parser as the YAML files (its JSON is YAML), so both
//! sources validate identically. A rejected object keeps its previous
//! version, and the reason goes to its owner as a Warning Event (`kubectl
//! describe` shows it). Kinds whose CRDs are not installed are retried with
//! backoff and do not hold back the others.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        watcher, WatchStreamExt,
    },
    Client,
};
use tokio::sync::Notify;

use crate::{
    compute,
    config_stream::Store,
    model::{parse_file, Cluster, Key, Located, Problem},
};

/// (group, version, kind, plural) of everything Ferry watches. RBAC: get,
/// list and watch on each, and create/patch on events.k8s.io events (see
/// docs/control-plane.md).
pub const WATCHED: &[(&str, &str, &str, &str)] = &[
    ("", "v1", "Namespace", "namespaces"),
    ("", "v1", "Node", "nodes"),
    ("", "v1", "Pod", "pods"),
    ("", "v1", "Service", "services"),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    ("security.istio.io", "v1", "PeerAuthentication", "peerauthentications"),
    (
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    ("networking.istio.io", "v1", "VirtualService", "virtualservices"),
    ("networking.istio.io", "v1", "DestinationRule", "destinationrules"),
    ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
    ("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes"),
    ("gateway.networking.k8s.io", "v1alpha2", "TCPRoute", "tcproutes"),
    ("ferry.dev", "v1alpha1", "RateLimitPolicy", "ratelimitpolicies"),
];

/// What every kind's watcher feeds and the publisher reads.
#[derive(Default)]
struct Shared {
    objects: Mutex<BTreeMap<Key, Located>>,
    /// Objects rejected now, with why (listed at the admin's /problems).
    rejected: Mutex<BTreeMap<Key, Vec<Problem>>>,
    /// Kinds that have completed their first list (or whose CRD is missing).
    listed: Mutex<std::collections::BTreeSet<&'static str>>,
    changed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The typed object for a watched one, or the problems that reject it.
pub fn convert(ar: &ApiResource, obj: &DynamicObject) -> Result<(Key, Located), Vec<Problem>> {
    let kind = &ar.kind;
    let ns = obj.metadata.namespace.as_deref().unwrap_or_default();
    let name = obj.metadata.name.as_deref().unwrap_or_default();
    let source = format!("kubernetes:{kind}/{ns}/{name}");
    // Items of a list come without apiVersion and kind (watch events have
    // them): the parser needs them, so they come from what was watched.
    let mut obj = obj.clone();
    obj.types = Some(kube::api::TypeMeta {
        api_version: ar.api_version.clone(),
        kind: ar.kind.clone(),
    });
    let json = serde_json::to_string(&obj).map_err(|e| {
        vec![Problem {
            severity: crate::model::Severity::Error,
            file: source.clone(),
            line: None,
            object: String::new(),
            field: String::new(),
            reason: e.to_string(),
        }]
    })?;
    let (mut docs, problems) = parse_file(&source, &json);
    match docs.pop() {
        Some(d) if problems.iter().all(|p| p.severity != crate::model::Severity::Error) => Ok((
            d.key,
            Located {
                object: d.object,
                file: source,
                line: None,
            },
        )),
        _ => Err(problems),
    }
}

/// Tells the object's owner why it was rejected (best effort: logged if the
/// Event cannot be written, e.g. without RBAC for events).
fn report(recorder: &Recorder, ar: &ApiResource, obj: &DynamicObject, problems: &[Problem]) {
    let note: String = problems
        .iter()
        .map(|p| format!("{}: {}", p.field, p.reason))
        .collect::<Vec<_>>()
        .join("; ");
    let reference = ObjectReference {
        api_version: Some(ar.api_version.clone()),
        kind: Some(ar.kind.clone()),
        name: obj.metadata.name.clone(),
        namespace: obj.metadata.namespace.clone(),
        uid: obj.metadata.uid.clone(),
        resource_version: obj.metadata.resource_version.clone(),
        ..Default::default()
    };
    let ev = Event {
        type_: EventType::Warning,
        reason: "InvalidConfig".into(),
        // An Event's note holds at most 1 kB.
        note: Some(note.chars().take(1000).collect()),
        action: "Validate".into(),
        secondary: None,
    };
    let recorder = recorder.clone();
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&ev, &reference).await {
            tracing::warn!(error = %e, "could not write the rejection Event");
        }
    });
}

/// Whether listing failed because an optional kind's CRD is not installed.
fn crd_missing(group: &str, e: &watcher::Error) -> bool {
    let core = group.is_empty() || group == "discovery.k8s.io";
    let not_found = matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404);
    !core && not_found
}

async fn watch_kind(
    client: Client,
    gvk: (&'static str, &'static str, &'static str, &'static str),
    shared: Arc<Shared>,
    recorder: Recorder,
) {
    let (group, version, kind, plural) = gvk;
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
    // Objects of this kind while a (re)list is in progress.
    let mut relist: Option<BTreeMap<Key, Located>> = None;
    let key_of = |o: &DynamicObject| Key {
        kind: kind.into(),
        namespace: o.metadata.namespace.clone().unwrap_or_default(),
        name: o.metadata.name.clone().unwrap_or_default(),
    };
    let upsert = |objects: &mut BTreeMap<Key, Located>, obj: &DynamicObject| match convert(&ar, obj) {
        Ok((k, l)) => {
            lock(&shared.rejected).remove(&k);
            objects.insert(k, l);
        }
        Err(problems) => {
            // Rejected: the previous version of this object (if any) stays.
            for p in &problems {
                tracing::error!(problem = %p, "object rejected");
            }
            report(&recorder, &ar, obj, &problems);
            lock(&shared.rejected).insert(key_of(obj), problems);
        }
    };
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => {
                relist = Some(BTreeMap::new());
                // Rejections are found again by the relist (or are gone).
                lock(&shared.rejected).retain(|k, _| k.kind != kind);
            }
            Ok(watcher::Event::InitApply(o)) => {
                if let Some(r) = relist.as_mut() {
                    upsert(r, &o);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let fresh = relist.take().unwrap_or_default();
                let n = fresh.len();
                let mut all = lock(&shared.objects);
                all.retain(|k, _| k.kind != kind);
                all.extend(fresh);
                drop(all);
                tracing::info!(kind, objects = n, "listed");
                lock(&shared.listed).insert(kind);
                shared.changed.notify_one();
            }
            Ok(watcher::Event::Apply(o)) => {
                upsert(&mut lock(&shared.objects), &o);
                shared.changed.notify_one();
            }
            Ok(watcher::Event::Delete(o)) => {
                let key = key_of(&o);
                lock(&shared.rejected).remove(&key);
                lock(&shared.objects).remove(&key);
                shared.changed.notify_one();
            }
            Err(e) => {
                tracing::warn!(kind, error = %e, "watch failed; retrying with backoff");
                // A kind whose CRD is not installed (404) must not hold back
                // the first snapshot; it joins when it lists. Any other
                // failure (API server unreachable, RBAC) holds it back: an
                // empty snapshot would tell agents everything is gone.
                if crd_missing(group, &e) && lock(&shared.listed).insert(kind) {
                    shared.changed.notify_one();
                }
            }
        }
    }
}

/// Watches everything and publishes each change (coalesced over 50 ms);
/// `current` holds the problems now (rejected objects and the analysis).
pub async fn run(client: Client, store: Arc<Store>, current: Arc<Mutex<Vec<Problem>>>) {
    let shared = Arc::new(Shared::default());
    let reporter = Reporter {
        controller: "ferry-control".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    for gvk in WATCHED {
        tokio::spawn(watch_kind(client.clone(), *gvk, shared.clone(), recorder.clone()));
    }
    loop {
        shared.changed.notified().await;
        // The first snapshot waits for every kind: a partial one (pods
        // listed, services not yet) would make agents drop services.
        if lock(&shared.listed).len() < WATCHED.len() {
            continue;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let cluster = Cluster {
            objects: lock(&shared.objects).clone(),
        };
        let view = compute::mesh_view(&cluster, false);
        let mut problems: Vec<Problem> = lock(&shared.rejected).values().flatten().cloned().collect();
        problems.extend(crate::analyze::analyze_with(&cluster, &view));
        *lock(&current) = problems;
        let (pods, services) = (view.workloads.len(), view.services.len());
        // Host-network pods are counted apart: never mesh workloads.
        let host_network_pods = view.host_network.len();
        let pending_pods = view.pending.len();
        if let Some(v) = store.publish(view) {
            tracing::info!(
                version = v,
                pods,
                pending_pods,
                host_network_pods,
                services,
                "cluster state changed"
            );
        }
    }
}
