//! Names of networks, endpoints, hosts and aliases are DNS labels, so that every one of
//! them can be resolved by the embedded DNS and used as a namespace name.

use crate::ModelError;

/// 1–63 characters of `a-z 0-9 -`, not starting or ending with `-`.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

pub fn validate_name(name: &str) -> Result<(), ModelError> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(ModelError::InvalidName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "s1", "front-end", "0", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "é", &"a".repeat(64), "a b"] {
            assert_eq!(validate_name(bad), Err(ModelError::InvalidName(bad.to_string())));
        }
    }
}
