//! The CA's CSR handling (`ca::Ca::sign_workload`): a CSR in PEM and a
//! SPIFFE id from the input (split at the last NUL; without one, a fixed
//! id), signed by a CA created once in a temporary directory. Must never
//! panic.

use std::{sync::OnceLock, time::Duration};

use ferry_control::ca::Ca;

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ferry-fuzz-ca-{}", std::process::id()));
        Ca::load_or_create(&dir).expect("test CA")
    })
}

/// One input (the cargo-fuzz target `ca_csr` and the replay test call this).
pub fn run(data: &[u8]) {
    let (csr, id) = match data.iter().rposition(|&b| b == 0) {
        Some(i) => (&data[..i], String::from_utf8_lossy(&data[i + 1..]).into_owned()),
        None => (data, "spiffe://cluster.local/ns/default/sa/default".to_owned()),
    };
    let _ = ca().sign_workload(&String::from_utf8_lossy(csr), &id, Duration::from_secs(3600));
}
