//! Request authentication (SPEC §3): HMAC-SHA256 over
//! `timestamp \n METHOD \n path \n body`, any of the tenant's secrets, a
//! replay window on the timestamp, constant-time comparison.

use rustc_hash::FxHashMap;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tai_core::config::{TenantConfig, Tier};

pub const TENANT: &str = "x-tai-tenant";
pub const TIMESTAMP: &str = "x-tai-timestamp";
pub const SIGNATURE: &str = "x-tai-signature";

#[derive(Clone)]
pub struct Tenant {
    /// One HMAC per secret, keyed once here: a request clones the keyed
    /// state instead of hashing the key again.
    pub macs: Vec<Hmac<Sha256>>,
    pub tier: Tier,
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenant")
            .field("secrets", &self.macs.len())
            .field("tier", &self.tier)
            .finish()
    }
}

/// Hashed with Fx, not SipHash: the map is built from the configuration
/// and only looked up by requests, so no client can fill it with
/// colliding keys.
pub type Tenants = FxHashMap<String, Tenant>;

pub fn tenants(config: &[TenantConfig]) -> Tenants {
    config
        .iter()
        .map(|t| {
            (
                t.id.clone(),
                Tenant {
                    macs: t
                        .secrets
                        .iter()
                        .map(|s| {
                            Hmac::<Sha256>::new_from_slice(s.as_bytes())
                                .expect("hmac takes any key length")
                        })
                        .collect(),
                    tier: t.tier,
                },
            )
        })
        .collect()
}

/// Why a request was refused. All answer `401 unauthorized`; the message
/// says which check failed, except that an unknown tenant and a bad
/// signature read the same, so tenants cannot be enumerated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("X-Tai-Timestamp must be unix seconds")]
    BadTimestamp,
    #[error("timestamp outside the {0} s replay window")]
    Stale(u64),
    #[error("X-Tai-Signature must be v1=<hex>")]
    BadSignatureFormat,
    #[error("signature does not match")]
    BadSignature,
}

/// Feeds the string to sign, `timestamp \n METHOD \n path \n body`, into
/// `mac` in its parts (no copy of the body): what `sign` and `verify` share.
fn update_string_to_sign(
    mac: &mut Hmac<Sha256>,
    timestamp: &str,
    method: &str,
    path: &str,
    body: &[u8],
) {
    for part in [timestamp, method, path] {
        mac.update(part.as_bytes());
        mac.update(b"\n");
    }
    mac.update(body);
}

/// `v1=<lowercase hex HMAC-SHA256(secret, string to sign)>`, for clients.
pub fn sign(secret: &[u8], timestamp: &str, method: &str, path: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key length");
    update_string_to_sign(&mut mac, timestamp, method, path, body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The request's signing headers.
#[derive(Debug, Clone, Copy)]
pub struct Presented<'a> {
    pub tenant: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// What a request that passed [`verify`] presented.
#[derive(Debug, Clone, Copy)]
pub struct Verified<'a> {
    pub tenant_id: &'a str,
    pub tenant: &'a Tenant,
    /// The signature's hex digits (for the replay cache).
    pub signature: &'a str,
    /// The request's timestamp, inside the window (for the replay cache).
    pub timestamp_secs: u64,
}

/// Checks a request; returns what it presented.
pub fn verify<'a>(
    tenants: &'a Tenants,
    p: Presented<'a>,
    method: &str,
    path: &str,
    body: &[u8],
    now_secs: u64,
    window_secs: u64,
) -> Result<Verified<'a>, AuthError> {
    let tenant_id = p.tenant.ok_or(AuthError::Missing("X-Tai-Tenant"))?;
    let ts = p.timestamp.ok_or(AuthError::Missing("X-Tai-Timestamp"))?;
    let sig = p.signature.ok_or(AuthError::Missing("X-Tai-Signature"))?;
    let ts_secs: u64 = ts.parse().map_err(|_| AuthError::BadTimestamp)?;
    if ts_secs.abs_diff(now_secs) > window_secs {
        return Err(AuthError::Stale(window_secs));
    }
    let hex_sig = sig
        .strip_prefix("v1=")
        .ok_or(AuthError::BadSignatureFormat)?;
    let mut raw = [0u8; 32];
    if hex::decode_to_slice(hex_sig, &mut raw).is_err() {
        // Not 64 hex digits: hex of another length cannot match, anything
        // else is not a signature at all.
        return Err(match hex::decode(hex_sig) {
            Ok(_) => AuthError::BadSignature,
            Err(_) => AuthError::BadSignatureFormat,
        });
    }
    let tenant = tenants.get(tenant_id).ok_or(AuthError::BadSignature)?;
    let ok = tenant.macs.iter().any(|keyed| {
        let mut mac = keyed.clone();
        update_string_to_sign(&mut mac, ts, method, path, body);
        mac.verify_slice(&raw).is_ok()
    });
    if ok {
        Ok(Verified {
            tenant_id,
            tenant,
            signature: hex_sig,
            timestamp_secs: ts_secs,
        })
    } else {
        Err(AuthError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Tenants {
        tenants(&[TenantConfig {
            id: "acme".into(),
            secrets: vec!["old".into(), "new".into()],
            tier: Tier::Standard,
        }])
    }

    #[test]
    fn the_signature_covers_the_spec_string_to_sign() {
        // SPEC §3: HMAC-SHA256 over `timestamp\nMETHOD\npath\nbody`,
        // computed here over the joined bytes, not through the shared helper.
        let body = br#"{"id":"s-1"}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(b"k").unwrap();
        mac.update(b"1700000000\nPOST\n/v1/signals\n{\"id\":\"s-1\"}");
        let expected = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(
            sign(b"k", "1700000000", "POST", "/v1/signals", body),
            expected
        );
    }

    #[test]
    fn any_rotated_secret_signs_and_everything_else_fails() {
        let t = setup();
        let body = br#"{"a":1}"#;
        let check = |tenant: &str, ts: &str, sig: &str, now: u64| {
            verify(
                &t,
                Presented {
                    tenant: Some(tenant),
                    timestamp: Some(ts),
                    signature: Some(sig),
                },
                "POST",
                "/v1/signals",
                body,
                now,
                300,
            )
            .map(|v| v.tenant_id.to_string())
        };
        for secret in [&b"old"[..], b"new"] {
            let sig = sign(secret, "1000", "POST", "/v1/signals", body);
            assert_eq!(check("acme", "1000", &sig, 1000).unwrap(), "acme");
            assert_eq!(
                check("acme", "1000", &sig, 1300).unwrap(),
                "acme",
                "edge of the window"
            );
            assert_eq!(
                check("acme", "1000", &sig, 1301),
                Err(AuthError::Stale(300))
            );
            assert_eq!(
                check("other", "1000", &sig, 1000),
                Err(AuthError::BadSignature)
            );
        }
        let wrong = sign(b"nope", "1000", "POST", "/v1/signals", body);
        assert_eq!(
            check("acme", "1000", &wrong, 1000),
            Err(AuthError::BadSignature)
        );
        let other_path = sign(b"new", "1000", "POST", "/v1/other", body);
        assert_eq!(
            check("acme", "1000", &other_path, 1000),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            check("acme", "soon", &wrong, 1000),
            Err(AuthError::BadTimestamp)
        );
        assert_eq!(
            check("acme", "1000", "deadbeef", 1000),
            Err(AuthError::BadSignatureFormat)
        );
        assert_eq!(
            check("acme", "1000", "v1=zz", 1000),
            Err(AuthError::BadSignatureFormat)
        );
        // Hex of the wrong length is a signature that does not match.
        let short = &wrong[..wrong.len() - 2];
        assert_eq!(
            check("acme", "1000", short, 1000),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            check("acme", "1000", &format!("{wrong}00"), 1000),
            Err(AuthError::BadSignature)
        );
        // Upper-case hex is the same signature.
        let good = sign(b"new", "1000", "POST", "/v1/signals", body);
        assert_eq!(
            check(
                "acme",
                "1000",
                &good.to_uppercase().replacen("V1=", "v1=", 1),
                1000
            )
            .unwrap(),
            "acme"
        );
    }
}
