//! Standard Webhooks signing: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
//!
//! Pure and allocation-light, because it runs once per attempt on the hot path: the HMAC key schedule is
//! computed once per secret (`Signer` holds the keyed state and clones it per message) instead of re-deriving
//! it for every delivery. Tested against the reference libraries' vectors (`shared/reference`).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Prefix of a symmetric secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Prefixes of an ed25519 signing key (seed and public key, 64 bytes) and of its public key (32 bytes).
pub const SIGNING_KEY_PREFIX: &str = "whsk_";
pub const PUBLIC_KEY_PREFIX: &str = "whpk_";

/// Why a secret could not be used. Never contains the secret itself (DESIGN.md invariant 7).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("secret does not start with \"whsec_\"")]
    Prefix,
    #[error("secret is not valid base64 after \"whsec_\"")]
    Base64,
    #[error("secret decodes to {0} bytes; it must be 24 to 64 bytes")]
    Length(usize),
    #[error("signing key is not \"whsk_\" followed by the base64 of a 64-byte ed25519 key whose second half is the public key of its first")]
    SigningKey,
}

/// Decodes `whsec_<base64>` into the HMAC key bytes.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, SecretError> {
    let b64 = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or(SecretError::Prefix)?;
    let key = STANDARD.decode(b64).map_err(|_| SecretError::Base64)?;
    if !(24..=64).contains(&key.len()) {
        return Err(SecretError::Length(key.len()));
    }
    Ok(key)
}

/// A new random secret in the `whsec_` form (32 random bytes).
pub fn generate_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// Signs messages with one secret; cheap to clone and share.
#[derive(Clone)]
pub struct Signer {
    mac: HmacSha256,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    pub fn new(secret: &str) -> Result<Self, SecretError> {
        let key = decode_secret(secret)?;
        let mac = HmacSha256::new_from_slice(&key).expect("hmac accepts keys of any length");
        Ok(Signer { mac })
    }

    /// Appends `v1,<base64 signature>` for the message to `out`.
    pub fn sign_into(&self, id: &str, timestamp: i64, body: &[u8], out: &mut String) {
        let mut mac = self.mac.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let tag = mac.finalize().into_bytes();
        out.push_str("v1,");
        STANDARD.encode_string(tag, out);
    }

    /// `v1,<base64 signature>` for the message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut out = String::with_capacity(48);
        self.sign_into(id, timestamp, body, &mut out);
        out
    }

    /// True if any `v1,` entry of a `webhook-signature` header value is this secret's signature.
    pub fn verify(&self, id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        let expected = self.sign(id, timestamp, body);
        header
            .split(' ')
            .filter(|s| s.starts_with("v1,"))
            .any(|candidate| constant_time_eq(candidate.as_bytes(), expected.as_bytes()))
    }
}

/// Asymmetric signing (`v1a`): ed25519 over the same content, for receivers that should not hold a secret.
#[derive(Clone)]
pub struct Ed25519Signer {
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for Ed25519Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ed25519Signer(..)")
    }
}

impl Ed25519Signer {
    /// From `whsk_<base64 of seed || public key>`; the public half must match the seed.
    pub fn new(signing_key: &str) -> Result<Self, SecretError> {
        let b64 = signing_key
            .strip_prefix(SIGNING_KEY_PREFIX)
            .ok_or(SecretError::SigningKey)?;
        let bytes: [u8; 64] = STANDARD
            .decode(b64)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(SecretError::SigningKey)?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| SecretError::SigningKey)?;
        Ok(Ed25519Signer { key })
    }

    /// A new key pair: (`whsk_…` signing key, `whpk_…` public key).
    pub fn generate() -> (String, String) {
        let seed: [u8; 32] = rand::random();
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        (
            format!(
                "{SIGNING_KEY_PREFIX}{}",
                STANDARD.encode(key.to_keypair_bytes())
            ),
            format!(
                "{PUBLIC_KEY_PREFIX}{}",
                STANDARD.encode(key.verifying_key().to_bytes())
            ),
        )
    }

    pub fn public_key(&self) -> String {
        format!(
            "{PUBLIC_KEY_PREFIX}{}",
            STANDARD.encode(self.key.verifying_key().to_bytes())
        )
    }

    /// Appends `v1a,<base64 signature>` to `out`.
    pub fn sign_into(&self, id: &str, timestamp: i64, body: &[u8], out: &mut String) {
        use ed25519_dalek::Signer as _;
        let ts = timestamp.to_string();
        let mut content = Vec::with_capacity(id.len() + ts.len() + body.len() + 2);
        content.extend_from_slice(id.as_bytes());
        content.push(b'.');
        content.extend_from_slice(ts.as_bytes());
        content.push(b'.');
        content.extend_from_slice(body);
        let signature = self.key.sign(&content);
        out.push_str("v1a,");
        STANDARD.encode_string(signature.to_bytes(), out);
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_a_from_the_reference_libraries() {
        let s = Signer::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = s.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        assert!(s.verify(
            id,
            1614265330,
            body,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        ));
        assert!(!s.verify(
            id,
            1614265330,
            body,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="
        ));
        // one valid entry among several (rotation) verifies
        assert!(s.verify(
            id,
            1614265330,
            body,
            "v1,AAAA v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        ));
        assert!(!s.verify(id, 1614265331, body, &sig));
    }

    #[test]
    fn vector_b_from_the_rust_reference_library() {
        let s = Signer::new("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let sig = s.sign(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(sig, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn ed25519_vector_from_the_reference_libraries() {
        let key = "whsk_6Xb/dCcHpPea21PS1N9VY/NZW723CEc77N4rJCubMbfVKIDij2HKpMKkioLlX0dRqSKJp4AJ6p9lMicMFs6Kvg==";
        let signer = Ed25519Signer::new(key).unwrap();
        let mut out = String::new();
        signer.sign_into(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
            &mut out,
        );
        assert_eq!(
            out,
            "v1a,hnO3f9T8Ytu9HwrXslvumlUpqtNVqkhqw/enGzPCXe5BdqzCInXqYXFymVJaA7AZdpXwVLPo3mNl8EM+m7TBAg=="
        );
        let (sk, pk) = Ed25519Signer::generate();
        assert_eq!(Ed25519Signer::new(&sk).unwrap().public_key(), pk);
        // a key whose public half does not match its seed is refused
        let mut bytes = STANDARD.decode(&key[5..]).unwrap();
        bytes[40] ^= 1;
        assert_eq!(
            Ed25519Signer::new(&format!("whsk_{}", STANDARD.encode(bytes))).unwrap_err(),
            SecretError::SigningKey
        );
        assert!(!format!("{signer:?}").contains("6Xb"));
    }

    #[test]
    fn secrets_are_validated() {
        assert_eq!(decode_secret("abc").unwrap_err(), SecretError::Prefix);
        assert_eq!(decode_secret("whsec_!!").unwrap_err(), SecretError::Base64);
        assert_eq!(
            decode_secret("whsec_AAAA").unwrap_err(),
            SecretError::Length(3)
        );
        let generated = generate_secret();
        assert_eq!(decode_secret(&generated).unwrap().len(), 32);
        assert!(!format!("{:?}", Signer::new(&generated).unwrap()).contains(&generated[6..]));
    }
}
