//! Names users give to jobs and nodes: they become path segments and metric labels.

/// Letters, digits, `-` and `_`, 1 to 64 characters.
pub fn valid_job_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
