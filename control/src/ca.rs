//! The certificate authority: a root (or intermediate) loaded from files, or
//! created on first start and kept; leaf certificates carry the workload's
//! SPIFFE id as their only SAN (a URI).
//!
//! Root rotation: `trust-bundle.pem` in the CA directory, if present, is the
//! set of roots agents must trust (old and new root during a rotation); it is
//! sent with every signed certificate. See docs/identity.md.

use std::{fs, path::Path, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA files in {dir}: {reason}")]
    Files { dir: String, reason: String },
    #[error("bad CSR: {0}")]
    Csr(String),
    #[error("signing: {0}")]
    Sign(String),
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    bundle_pem: String,
}

pub struct Signed {
    pub chain_pem: String,
    pub not_after_unix: i64,
}

impl Ca {
    /// Loads `ca.cert.pem` + `ca.key.pem` from `dir`, or creates a new root there.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let err = |reason: String| CaError::Files {
            dir: dir.display().to_string(),
            reason,
        };
        let (cert_p, key_p) = (dir.join("ca.cert.pem"), dir.join("ca.key.pem"));
        if !cert_p.exists() {
            fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
            let key = KeyPair::generate().map_err(|e| err(e.to_string()))?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "ferry");
            dn.push(DnType::CommonName, "ferry root CA");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.not_before = time::OffsetDateTime::now_utc() - Duration::from_secs(3600);
            params.not_after = time::OffsetDateTime::now_utc() + Duration::from_secs(10 * 365 * 86400);
            let cert = params.self_signed(&key).map_err(|e| err(e.to_string()))?;
            // The key first, the certificate last: a crash in between leaves
            // no certificate, so the next start creates both again.
            write_new(&key_p, &key.serialize_pem(), 0o600).map_err(|e| err(format!("{}: {e}", key_p.display())))?;
            write_new(&cert_p, &cert.pem(), 0o644).map_err(|e| err(format!("{}: {e}", cert_p.display())))?;
            tracing::info!(dir = %dir.display(), "created a new root CA");
        }
        let cert_pem = fs::read_to_string(&cert_p).map_err(|e| err(format!("{}: {e}", cert_p.display())))?;
        let key_pem = fs::read_to_string(&key_p).map_err(|e| err(format!("{}: {e}", key_p.display())))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| err(format!("{}: {e}", key_p.display())))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| err(format!("{}: {e}", cert_p.display())))?;
        let bundle_pem = fs::read_to_string(dir.join("trust-bundle.pem")).unwrap_or_else(|_| cert_pem.clone());
        Ok(Self {
            issuer,
            cert_pem,
            bundle_pem,
        })
    }

    pub fn trust_bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// Signs the CSR's public key (after checking the CSR's own signature) for
    /// `spiffe_id`, valid for `ttl`. The CSR's subject and SANs are ignored.
    pub fn sign_workload(&self, csr_pem: &str, spiffe_id: &str, ttl: Duration) -> Result<Signed, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::Csr(e.to_string()))?;
        let mut params = CertificateParams::default();
        let uri = spiffe_id
            .to_owned()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        // A little backdating absorbs clock skew between nodes.
        params.not_before = now - Duration::from_secs(60);
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Signed {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            not_after_unix: params.not_after.unix_timestamp(),
        })
    }

    /// A server certificate for the CA's own gRPC endpoint (DNS name `name`).
    pub fn server_cert(&self, name: &str) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(|e| CaError::Sign(e.to_string()))?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_after = time::OffsetDateTime::now_utc() + Duration::from_secs(365 * 86400);
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok((format!("{}{}", cert.pem(), self.cert_pem), key.serialize_pem()))
    }
}

/// A random, positive 128-bit serial (RFC 5280: unique per CA; without one,
/// rcgen derives it from the public key, so one key would get one serial
/// for every certificate).
fn random_serial() -> rcgen::SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // never shorter than 16 bytes, never zero
    rcgen::SerialNumber::from_slice(&b)
}

/// Writes `text` to `path` with `mode`, atomically: a new file made with
/// that mode from the start (never readable by others, not even briefly),
/// written and synced under a temporary name, then renamed into place.
fn write_new(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial_of(chain_pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).unwrap();
        cert.raw_serial().to_vec()
    }

    #[test]
    fn the_key_is_private_and_one_key_gets_different_serials() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!(
            "ferry-ca-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let ca = Ca::load_or_create(&dir).unwrap();
        let mode = fs::metadata(dir.join("ca.key.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir
            .read_dir()
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains("tmp")));
        // The same key, twice (a renewal that reuses its key, or two
        // identities): two different serials, each 128 bits.
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let ttl = Duration::from_secs(60);
        let a = ca.sign_workload(&csr, "spiffe://cluster.local/ns/a/sa/x", ttl).unwrap();
        let b = ca.sign_workload(&csr, "spiffe://cluster.local/ns/b/sa/y", ttl).unwrap();
        let (sa, sb) = (serial_of(&a.chain_pem), serial_of(&b.chain_pem));
        assert_ne!(sa, sb);
        assert_eq!((sa.len(), sb.len()), (16, 16));
        // Loading again finds the same CA.
        assert_eq!(
            Ca::load_or_create(&dir).unwrap().trust_bundle_pem(),
            ca.trust_bundle_pem()
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
