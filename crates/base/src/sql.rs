//! SQL names as conveyor accepts them from a pipeline file or a setting.

/// Whether `name` can be used as an SQL identifier without surprises (it is quoted all the same).
pub fn is_sql_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name.len() <= 63
}
