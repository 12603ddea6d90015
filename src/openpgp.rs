//! OpenPGP public keys as a repository's `key` gives them: binary or ASCII-armored, one or
//! several, turned into one binary keyring (what apt's `signed-by=` and gpgv read) with each
//! primary key's fingerprint. Only packet framing is read (RFC 4880 / RFC 9580): enough to
//! refuse what is not a public key and to name the keys, nothing cryptographic.

use sha1::Sha1;
use sha2::{Digest, Sha256};

/// Keys ready for apt: one binary keyring and the fingerprints of its primary keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyring {
    /// The keys as one binary keyring (transferable public keys, one after another).
    pub bytes: Vec<u8>,
    /// The primary keys' fingerprints, uppercase hex, in order.
    pub fingerprints: Vec<String>,
}

const ARMOR_BEGIN: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----";
const ARMOR_END: &str = "-----END PGP PUBLIC KEY BLOCK-----";

/// True when `text` holds an ASCII-armored public key block (so a `key` is inline text, not
/// a file name).
pub fn is_armored(text: &str) -> bool {
    text.contains(ARMOR_BEGIN)
}

/// Reads `data` (binary keys, or one or more armored public key blocks) into a keyring.
pub fn keyring(data: &[u8]) -> Result<Keyring, String> {
    let text = std::str::from_utf8(data).ok();
    let bytes = match text {
        Some(t) if t.contains("-----BEGIN PGP PRIVATE KEY BLOCK-----") => {
            return Err("it is a private key: give the public key (`gpg --export --armor`)".into());
        }
        Some(t) if is_armored(t) => dearmor(t)?,
        _ if data.first().is_some_and(|b| b & 0x80 != 0) => data.to_vec(),
        _ => {
            return Err(
                "it is neither an OpenPGP key (binary) nor an armored public key block".into(),
            );
        }
    };
    let mut fingerprints = Vec::new();
    for p in packets(&bytes)? {
        match p.tag {
            6 => fingerprints.push(fingerprint(p.body)?),
            5 | 7 => return Err("it holds a secret key: give the public key".into()),
            _ => {}
        }
    }
    if fingerprints.is_empty() {
        return Err("it holds no public key".into());
    }
    Ok(Keyring {
        bytes,
        fingerprints,
    })
}

/// The binary contents of every armored public key block in `text`, one after another.
fn dearmor(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    let mut blocks = 0;
    while lines.any(|l| l == ARMOR_BEGIN) {
        // Armor headers (`Comment: ...`) end at the first empty line.
        let mut b64 = String::new();
        let mut in_headers = true;
        let mut ended = false;
        for l in lines.by_ref() {
            if l == ARMOR_END {
                ended = true;
                break;
            }
            if in_headers {
                if l.is_empty() {
                    in_headers = false;
                } else if !l.contains(':') {
                    // No headers at all: this line is data already.
                    in_headers = false;
                    b64.push_str(l);
                }
                continue;
            }
            if l.starts_with('=') && l.len() == 5 {
                continue; // the CRC-24 checksum line
            }
            b64.push_str(l);
        }
        if !ended {
            return Err(format!("an armored key block has no `{ARMOR_END}` line"));
        }
        out.extend(base64(&b64)?);
        blocks += 1;
    }
    if blocks == 0 {
        return Err("no armored public key block".into());
    }
    Ok(out)
}

fn base64(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            b' ' | b'\t' | b'\r' | b'\n' => continue,
            _ => {
                return Err(format!(
                    "an armored key block holds `{}`, not base64",
                    c as char
                ));
            }
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

struct Packet<'a> {
    tag: u8,
    body: &'a [u8],
}

/// The packets of a binary OpenPGP stream (their framing only).
fn packets(data: &[u8]) -> Result<Vec<Packet<'_>>, String> {
    let bad = || "the key data is not a well-formed OpenPGP packet stream".to_string();
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let h = data[i];
        if h & 0x80 == 0 {
            return Err(bad());
        }
        let (tag, len, header) = if h & 0x40 != 0 {
            let tag = h & 0x3f;
            let o1 = *data.get(i + 1).ok_or_else(bad)? as usize;
            match o1 {
                0..=191 => (tag, o1, 2),
                192..=223 => {
                    let o2 = *data.get(i + 2).ok_or_else(bad)? as usize;
                    (tag, ((o1 - 192) << 8) + o2 + 192, 3)
                }
                255 => {
                    let b = data.get(i + 2..i + 6).ok_or_else(bad)?;
                    (
                        tag,
                        u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize,
                        6,
                    )
                }
                // Partial lengths never frame a key packet.
                _ => return Err(bad()),
            }
        } else {
            let tag = (h >> 2) & 0x0f;
            match h & 3 {
                0 => (tag, *data.get(i + 1).ok_or_else(bad)? as usize, 2),
                1 => {
                    let b = data.get(i + 1..i + 3).ok_or_else(bad)?;
                    (tag, u16::from_be_bytes([b[0], b[1]]) as usize, 3)
                }
                2 => {
                    let b = data.get(i + 1..i + 5).ok_or_else(bad)?;
                    (
                        tag,
                        u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize,
                        5,
                    )
                }
                _ => return Err(bad()),
            }
        };
        let start = i + header;
        let body = data.get(start..start + len).ok_or_else(bad)?;
        out.push(Packet { tag, body });
        i = start + len;
    }
    Ok(out)
}

/// The fingerprint of a public-key packet body (v4: SHA-1; v5 and v6: SHA-256).
fn fingerprint(body: &[u8]) -> Result<String, String> {
    let digest: Vec<u8> = match body.first() {
        Some(4) => {
            let mut h = Sha1::new();
            h.update([0x99]);
            h.update((body.len() as u16).to_be_bytes());
            h.update(body);
            h.finalize().to_vec()
        }
        Some(v @ (5 | 6)) => {
            let mut h = Sha256::new();
            h.update([if *v == 5 { 0x9a } else { 0x9b }]);
            h.update((body.len() as u32).to_be_bytes());
            h.update(body);
            h.finalize().to_vec()
        }
        Some(v) => return Err(format!("a version {v} key, which apt does not read")),
        None => return Err("an empty key packet".into()),
    };
    Ok(crate::pack::digest::hex(&digest).to_uppercase())
}

/// The 16-hex-digit key ID of a fingerprint, as apt's messages name keys (`NO_PUBKEY ...`).
pub fn key_id(fingerprint: &str) -> &str {
    let n = fingerprint.len();
    if n == 40 {
        &fingerprint[24..]
    } else {
        &fingerprint[..16.min(n)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v4 public key packet (an ed25519 key's body) framed old-style, with a user ID packet.
    fn sample_binary() -> Vec<u8> {
        let body: Vec<u8> = [
            vec![4, 0x65, 0x00, 0x00, 0x00, 22],
            vec![9, 0x2b, 0x06, 0x01, 0x04, 0x01, 0xda, 0x47, 0x0f, 0x01],
            vec![0x01, 0x07, 0x40],
            vec![7u8; 32],
        ]
        .concat();
        let mut out = vec![0x98, body.len() as u8];
        out.extend(&body);
        let uid = b"debimg test <t@debimg.invalid>";
        out.push(0xb4);
        out.push(uid.len() as u8);
        out.extend(uid);
        out
    }

    fn armor(bin: &[u8]) -> String {
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for chunk in bin.chunks(3) {
            let n = chunk.len();
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for k in 0..4 {
                if k <= n {
                    s.push(T[((v >> (18 - 6 * k)) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        format!("{ARMOR_BEGIN}\nComment: a test key\n\n{s}\n=AAAA\n{ARMOR_END}\n")
    }

    #[test]
    fn binary_and_armored_keys_give_one_keyring() {
        let bin = sample_binary();
        let k = keyring(&bin).unwrap();
        assert_eq!(k.bytes, bin);
        assert_eq!(k.fingerprints.len(), 1);
        assert_eq!(k.fingerprints[0].len(), 40);
        let fp = k.fingerprints[0].clone();
        assert_eq!(key_id(&fp), &fp[24..]);
        let armored = armor(&bin);
        assert!(is_armored(&armored));
        assert_eq!(keyring(armored.as_bytes()).unwrap(), k);
        // Two blocks: both keys, in order.
        let two = format!("{armored}\n{armored}");
        let k2 = keyring(two.as_bytes()).unwrap();
        assert_eq!(k2.bytes, [bin.clone(), bin].concat());
        assert_eq!(k2.fingerprints, [fp.clone(), fp]);
    }

    #[test]
    fn what_is_not_a_public_key_is_refused() {
        for (data, says) in [
            (&b"hello"[..], "neither"),
            (
                &b"-----BEGIN PGP PRIVATE KEY BLOCK-----\nx\n"[..],
                "private key",
            ),
            (&[0x98u8, 10, 4][..], "well-formed"),
            (&[0xb4u8, 1, b'x'][..], "no public key"),
            (&[0x94u8, 1, 4][..], "secret key"),
        ] {
            let e = keyring(data).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        let e = keyring(format!("{ARMOR_BEGIN}\n\nAAAA").as_bytes()).unwrap_err();
        assert!(e.contains("END"), "{e}");
    }
}
