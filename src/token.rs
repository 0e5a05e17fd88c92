//! Tokens: the UUID v4 that names a stream, with the stream's registry address folded into it.
//!
//! Owns the token's bit layout and its text form. A token is 122 random bits from the OS CSPRNG in
//! UUID v4 form, except that its first 32 bits (the first 8 hex digits) carry the registry shard and
//! slot. That makes a lookup one shard lock and one slab index, with no token→slot map to keep in
//! memory; the whole 128-bit token is still compared on lookup, and the 90 bits left random are what a
//! guesser faces (a stale token whose slot was reused never matches).
//!
//! In a cluster (PROTOCOL §10) the address field's top `NODE_BITS` name the node that issued the
//! token, in the clear, so any node can route a token without asking Redis; the registry then
//! addresses its streams with the 24 bits left.
//!
//! It must not decide shard counts or slot policy: the registry says which (shard, slot) to encode.

use std::fmt;

/// Bits of the address field: the shard in the low `SHARD_BITS`, the slot above it.
pub const ADDRESS_BITS: u32 = 32;
/// Bits of the address field that name the issuing node, in a cluster.
pub const NODE_BITS: u32 = 8;
const ADDRESS_SHIFT: u32 = 128 - ADDRESS_BITS;
const VERSION_MASK: u128 = 0xF << 76;
const VERSION_4: u128 = 0x4 << 76;
const VARIANT_MASK: u128 = 0b11 << 62;
const VARIANT_RFC4122: u128 = 0b10 << 62;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(u128);

impl Token {
    /// Random bits for a new token; the registry folds the address in with [`Token::with_address`].
    pub fn random() -> Token {
        let mut bytes = [0u8; 16];
        getrandom::getrandom(&mut bytes).expect("the OS CSPRNG is available");
        let bits = u128::from_be_bytes(bytes);
        Token((bits & !VERSION_MASK & !VARIANT_MASK) | VERSION_4 | VARIANT_RFC4122)
    }

    pub fn with_address(self, address: u32) -> Token {
        let random = self.0 & (u128::MAX >> ADDRESS_BITS);
        Token(random | (u128::from(address) << ADDRESS_SHIFT))
    }

    pub fn address(self) -> u32 {
        (self.0 >> ADDRESS_SHIFT) as u32
    }

    /// The issuing node, in a cluster: the address field's top `NODE_BITS`.
    pub fn node(self) -> u8 {
        (self.address() >> (ADDRESS_BITS - NODE_BITS)) as u8
    }

    /// The 16 bytes of the UUID, for node-to-node messages (PROTOCOL §10).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Token {
        Token(u128::from_be_bytes(bytes))
    }

    /// Parses the canonical 36-character form; upper-case hex is accepted as RFC 4122 asks.
    pub fn parse(text: &str) -> Option<Token> {
        let bytes = text.as_bytes();
        if bytes.len() != 36 {
            return None;
        }
        let mut value: u128 = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if b != b'-' {
                    return None;
                }
                continue;
            }
            let digit = (b as char).to_digit(16)?;
            value = value << 4 | u128::from(digit);
        }
        Some(Token(value))
    }

    /// Writes the lower-case hyphenated form into `out` without allocating.
    pub fn write_to(self, out: &mut [u8; 36]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut nibble = 32;
        for (i, slot) in out.iter_mut().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                *slot = b'-';
            } else {
                nibble -= 1;
                *slot = HEX[(self.0 >> (nibble * 4)) as usize & 0xF];
            }
        }
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; 36];
        self.write_to(&mut out);
        f.write_str(std::str::from_utf8(&out).expect("ASCII"))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_lowercase_uuid_v4_that_round_trips() {
        for address in [0, 1, 0xDEAD_BEEF, u32::MAX] {
            let token = Token::random().with_address(address);
            let text = token.to_string();
            assert_eq!(text.len(), 36);
            assert_eq!(&text[14..15], "4", "{text}");
            assert!(matches!(&text[19..20], "8" | "9" | "a" | "b"), "{text}");
            assert!(text
                .chars()
                .all(|c| c == '-' || matches!(c, '0'..='9' | 'a'..='f')));
            assert_eq!(token.address(), address);
            assert_eq!(Token::parse(&text), Some(token));
            assert_eq!(Token::parse(&text.to_uppercase()), Some(token));
        }
    }

    #[test]
    fn random_bits_differ() {
        let a = Token::random().with_address(7);
        let b = Token::random().with_address(7);
        assert_ne!(a, b);
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "not-a-token",
            "0123456789abcdef0123456789abcdef0123",
            "01234567-89ab-cdef-0123-456789abcdeg",
            "01234567-89ab-cdef-0123_456789abcdef",
            "01234567-89ab-cdef-0123-456789abcdef0",
        ] {
            assert_eq!(Token::parse(bad), None, "{bad}");
        }
    }
}
