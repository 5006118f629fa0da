//! [`ConfigError`]: one sentence naming the file, the line, the element (and attribute), what
//! was expected and what was found, with a suggestion when a name looks misspelt.

use std::path::{Path, PathBuf};

/// What went wrong, which decides the shape of the sentence (see [`ConfigError`]'s `Display`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// The file could not be read (missing, unreadable). `found` holds the reason.
    Io,
    /// The text is not well-formed XML. `found` holds the parser's message.
    Xml,
    /// An element that is not allowed where it is. `element` is the unknown name; `parent` the
    /// element it appeared in (`None` at the top of the file).
    UnknownElement { parent: Option<String> },
    /// An attribute that the element does not take. `attribute` is the unknown name.
    UnknownAttribute,
    /// A required attribute is absent.
    MissingAttribute,
    /// A value (or a combination of elements) is not acceptable.
    Invalid,
}

/// A configuration error in `cluster.xml` or a `userconfig.xml`.
///
/// `Display` renders one sentence, for example
/// `/etc/hamirror/modules/web01/userconfig.xml:3: <heart> attribute "pulse": expected a
/// duration with a unit (ms, s, m, h), found "700"` or `...:3: unknown attribute "timout" on
/// <heart>, expected one of pulse, timeout (did you mean "timeout"?)`.
///
/// The details ([`ConfigErrorInfo`]) are boxed to keep `Result`s small; read them through
/// `Deref` (`err.file`, `err.line`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.0.sentence())]
pub struct ConfigError(Box<ConfigErrorInfo>);

impl std::ops::Deref for ConfigError {
    type Target = ConfigErrorInfo;
    fn deref(&self) -> &ConfigErrorInfo {
        &self.0
    }
}

/// The details of a [`ConfigError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrorInfo {
    pub file: PathBuf,
    /// 1-based line; `None` only when the file could not be read at all.
    pub line: Option<usize>,
    pub kind: ConfigErrorKind,
    /// The element concerned (without angle brackets), `None` for read errors and malformed XML.
    pub element: Option<String>,
    pub attribute: Option<String>,
    /// What would have been accepted, as a phrase ("a duration with a unit (ms, s, m, h)").
    pub expected: String,
    /// What was there: the raw attribute value for attribute errors, a phrase otherwise.
    pub found: Option<String>,
    /// The nearest valid name or value, when the input looks like a misspelling of it.
    pub suggestion: Option<String>,
    /// Extra explanation shown in parentheses at the end.
    pub note: Option<String>,
}

impl ConfigError {
    fn new(file: &Path, line: Option<usize>, kind: ConfigErrorKind) -> ConfigError {
        ConfigError(Box::new(ConfigErrorInfo {
            file: file.to_path_buf(),
            line,
            kind,
            element: None,
            attribute: None,
            expected: String::new(),
            found: None,
            suggestion: None,
            note: None,
        }))
    }

    /// The file could not be read.
    pub fn io(file: &Path, err: &std::io::Error) -> ConfigError {
        let found = match err.kind() {
            std::io::ErrorKind::NotFound => "file not found".to_string(),
            std::io::ErrorKind::PermissionDenied => "cannot read the file: permission denied".to_string(),
            _ => format!("cannot read the file: {err}"),
        };
        let mut e = ConfigError::new(file, None, ConfigErrorKind::Io);
        e.0.expected = "a readable file".to_string();
        e.0.found = Some(found);
        e
    }

    /// The text is not well-formed XML (or not UTF-8).
    pub fn xml(file: &Path, line: usize, message: impl Into<String>) -> ConfigError {
        let mut e = ConfigError::new(file, Some(line), ConfigErrorKind::Xml);
        e.0.expected = "well-formed XML".to_string();
        e.0.found = Some(message.into());
        e
    }

    /// A value of attribute `attribute` on `<element>` is not acceptable; `found` is the raw value.
    pub fn invalid_attr(
        file: &Path,
        line: usize,
        element: &str,
        attribute: &str,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> ConfigError {
        let mut e = ConfigError::new(file, Some(line), ConfigErrorKind::Invalid);
        e.0.element = Some(element.to_string());
        e.0.attribute = Some(attribute.to_string());
        e.0.expected = expected.into();
        e.0.found = Some(found.into());
        e
    }

    /// `<element>` as a whole is not acceptable (a missing child, a conflict between elements).
    pub fn invalid_element(
        file: &Path,
        line: usize,
        element: &str,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> ConfigError {
        let mut e = ConfigError::new(file, Some(line), ConfigErrorKind::Invalid);
        e.0.element = Some(element.to_string());
        e.0.expected = expected.into();
        e.0.found = Some(found.into());
        e
    }

    /// A required attribute is absent.
    pub fn missing_attr(
        file: &Path,
        line: usize,
        element: &str,
        attribute: &str,
        expected: impl Into<String>,
    ) -> ConfigError {
        let mut e = ConfigError::new(file, Some(line), ConfigErrorKind::MissingAttribute);
        e.0.element = Some(element.to_string());
        e.0.attribute = Some(attribute.to_string());
        e.0.expected = expected.into();
        e
    }

    /// `attribute` is not one of `allowed` on `<element>`.
    pub fn unknown_attr(file: &Path, line: usize, element: &str, attribute: &str, allowed: &[&str]) -> ConfigError {
        let mut e = ConfigError::new(file, Some(line), ConfigErrorKind::UnknownAttribute);
        e.0.element = Some(element.to_string());
        e.0.attribute = Some(attribute.to_string());
        e.0.expected = one_of(allowed, "no attributes", false);
        e.0.suggestion = nearest(attribute, allowed.iter().copied()).map(str::to_string);
        e
    }

    /// `<element>` is not one of `allowed` inside `<parent>` (or at the top of the file).
    pub fn unknown_element(
        file: &Path,
        line: usize,
        element: &str,
        parent: Option<&str>,
        allowed: &[&str],
    ) -> ConfigError {
        let mut e =
            ConfigError::new(file, Some(line), ConfigErrorKind::UnknownElement { parent: parent.map(str::to_string) });
        e.0.element = Some(element.to_string());
        e.0.expected = one_of(allowed, "no child elements", true);
        if allowed.len() > 1 || parent.is_none() {
            e.0.suggestion = nearest(element, allowed.iter().copied()).map(str::to_string);
        }
        e
    }

    /// Adds a suggestion (shown as `(did you mean "..."?)`).
    pub fn with_suggestion(mut self, suggestion: Option<impl Into<String>>) -> ConfigError {
        self.0.suggestion = suggestion.map(Into::into);
        self
    }

    /// Adds a note (shown in parentheses at the end).
    pub fn with_note(mut self, note: impl Into<String>) -> ConfigError {
        self.0.note = Some(note.into());
        self
    }
}

impl ConfigErrorInfo {
    /// The one-sentence message (also what `Display` prints).
    pub fn sentence(&self) -> String {
        let mut s = self.file.display().to_string();
        if let Some(line) = self.line {
            s.push_str(&format!(":{line}"));
        }
        s.push_str(": ");
        let el = self.element.as_deref().unwrap_or("?");
        let attr = self.attribute.as_deref().unwrap_or("?");
        let found = self.found.as_deref().unwrap_or("nothing");
        let element_suggestion = matches!(self.kind, ConfigErrorKind::UnknownElement { .. });
        match &self.kind {
            ConfigErrorKind::Io => s.push_str(found),
            ConfigErrorKind::Xml => s.push_str(&format!("malformed XML: {found}")),
            ConfigErrorKind::UnknownElement { parent } => {
                s.push_str(&format!("unknown element <{el}>"));
                match parent {
                    Some(p) => s.push_str(&format!(" in <{p}>")),
                    None => s.push_str(" at the top of the file"),
                }
                s.push_str(&format!(", expected {}", self.expected));
            }
            ConfigErrorKind::UnknownAttribute => {
                s.push_str(&format!("unknown attribute \"{attr}\" on <{el}>, expected {}", self.expected))
            }
            ConfigErrorKind::MissingAttribute => {
                s.push_str(&format!("<{el}>: missing attribute \"{attr}\", expected {}", self.expected))
            }
            ConfigErrorKind::Invalid => match &self.attribute {
                Some(attr) => {
                    s.push_str(&format!("<{el}> attribute \"{attr}\": expected {}, found \"{found}\"", self.expected))
                }
                None => s.push_str(&format!("<{el}>: expected {}, found {found}", self.expected)),
            },
        }
        if let Some(sugg) = &self.suggestion {
            if element_suggestion {
                s.push_str(&format!(" (did you mean <{sugg}>?)"));
            } else {
                s.push_str(&format!(" (did you mean \"{sugg}\"?)"));
            }
        }
        if let Some(note) = &self.note {
            s.push_str(&format!(" ({note})"));
        }
        // One line, whatever the values hold: control characters are shown escaped.
        if s.chars().any(char::is_control) {
            s = s
                .chars()
                .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
                .collect();
        }
        s
    }
}

/// `one of a, b, c` (or `a` alone, or `none` when the list is empty).
fn one_of(allowed: &[&str], none: &str, elements: bool) -> String {
    let show = |n: &&str| {
        if elements {
            format!("<{n}>")
        } else {
            (*n).to_string()
        }
    };
    match allowed {
        [] => none.to_string(),
        [one] => show(one),
        _ => format!("one of {}", allowed.iter().map(show).collect::<Vec<_>>().join(", ")),
    }
}

/// The candidate nearest to `word` by edit distance (case-insensitive), when it is close enough
/// to be a plausible misspelling: at most 2 edits, and fewer edits than the candidate's length.
pub(crate) fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    if word.is_empty() || word.chars().count() > 64 {
        return None;
    }
    let w: Vec<char> = word.to_lowercase().chars().collect();
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        if c == word {
            continue;
        }
        let cl: Vec<char> = c.to_lowercase().chars().collect();
        let d = edit_distance(&w, &cl);
        let better = match best {
            Some((bd, _)) => d < bd,
            None => true,
        };
        if d <= 2 && d < cl.len().max(1) && better {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Levenshtein distance, with a transposition of two adjacent characters counted as one edit.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let (n, m) = (a.len(), b.len());
    let mut d = vec![vec![0usize; m + 1]; n + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=n {
        for j in 1..=m {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[n][m]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_finds_close_names_only() {
        assert_eq!(nearest("timout", ["pulse", "timeout"]), Some("timeout"));
        assert_eq!(nearest("Heart", ["heart", "check"]), Some("heart"));
        assert_eq!(nearest("hraet", ["heart", "check"]), Some("heart"));
        assert_eq!(nearest("zzzzzz", ["heart", "check"]), None);
        assert_eq!(nearest("ab", ["on", "off"]), None);
        assert_eq!(nearest("", ["on"]), None);
    }
}
