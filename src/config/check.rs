//! Validation helpers over the element tree: allowed attributes and children, required values,
//! typed attribute readers. Each turns a problem into a [`ConfigError`] at the right line.

use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use super::error::{nearest, ConfigError};
use super::units::{self, format_duration, UnitError};
use super::xml::{Attr, Element};

pub(crate) type R<T> = Result<T, ConfigError>;

pub(crate) const NODE_NAME_EXPECTED: &str =
    "a name of 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit";

/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,62}`: node, lan and cluster names.
pub(crate) fn is_node_name(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    s.len() <= 63 && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Validation context: the file every error names.
pub(crate) struct Ck<'a> {
    pub file: &'a Path,
}

impl<'a> Ck<'a> {
    pub fn new(file: &'a Path) -> Ck<'a> {
        Ck { file }
    }

    /// The root element must be `<name>`.
    pub fn root(&self, el: &Element, name: &str) -> R<()> {
        if el.name == name {
            Ok(())
        } else {
            Err(ConfigError::unknown_element(self.file, el.line, &el.name, None, &[name]))
        }
    }

    /// Every attribute of `el` is one of `allowed`.
    pub fn attrs(&self, el: &Element, allowed: &[&str]) -> R<()> {
        match el.attrs.iter().find(|a| !allowed.contains(&a.name.as_str())) {
            Some(a) => Err(ConfigError::unknown_attr(self.file, a.line, &el.name, &a.name, allowed)),
            None => Ok(()),
        }
    }

    /// Every child of `el` is one of `allowed`.
    pub fn children(&self, el: &Element, allowed: &[&str]) -> R<()> {
        match el.children.iter().find(|c| !allowed.contains(&c.name.as_str())) {
            Some(c) => Err(ConfigError::unknown_element(self.file, c.line, &c.name, Some(&el.name), allowed)),
            None => Ok(()),
        }
    }

    /// The only `<name>` child of `el`, if any; a second one is an error.
    pub fn single<'e>(&self, el: &'e Element, name: &str) -> R<Option<&'e Element>> {
        let mut it = el.children.iter().filter(|c| c.name == name);
        let first = it.next();
        match (first, it.next()) {
            (Some(first), Some(second)) => Err(self.bad_el(
                second,
                format!("at most one <{name}> in <{}>", el.name),
                format!("a second one (the first is on line {})", first.line),
            )),
            (first, _) => Ok(first),
        }
    }

    /// The attribute `name`, which must be present.
    pub fn req<'e>(&self, el: &'e Element, name: &str, expected: &str) -> R<&'e Attr> {
        el.attr(name).ok_or_else(|| ConfigError::missing_attr(self.file, el.line, &el.name, name, expected))
    }

    /// `<el> attribute "a": expected .., found "value"`.
    pub fn bad(&self, el: &Element, a: &Attr, expected: impl Into<String>) -> ConfigError {
        ConfigError::invalid_attr(self.file, a.line, &el.name, &a.name, expected, a.value.clone())
    }

    /// Like [`Ck::bad`] for the attribute called `name`; falls back to the element when the
    /// attribute is absent (callers use it for attributes already known to be present).
    pub fn bad_named(&self, el: &Element, name: &str, expected: impl Into<String>) -> ConfigError {
        match el.attr(name) {
            Some(a) => self.bad(el, a, expected),
            None => ConfigError::missing_attr(self.file, el.line, &el.name, name, expected),
        }
    }

    /// `<el>: expected .., found ..`.
    pub fn bad_el(&self, el: &Element, expected: impl Into<String>, found: impl Into<String>) -> ConfigError {
        ConfigError::invalid_element(self.file, el.line, &el.name, expected, found)
    }

    fn unit_error(&self, el: &Element, a: &Attr, e: UnitError) -> ConfigError {
        let err = self.bad(el, a, e.expected).with_suggestion(e.suggestion);
        match e.note {
            Some(note) => err.with_note(note),
            None => err,
        }
    }

    /// A duration attribute, `default` when absent, and at least `min`.
    pub fn duration(&self, el: &Element, name: &str, default: Duration, min: Duration) -> R<Duration> {
        let Some(a) = el.attr(name) else {
            return Ok(default);
        };
        let d = units::duration(&a.value).map_err(|e| self.unit_error(el, a, e))?;
        if d < min {
            return Err(self.bad(el, a, format!("a duration of at least {}", format_duration(min))));
        }
        Ok(d)
    }

    /// A size attribute (bytes, KiB, MiB, GiB), `default` when absent.
    pub fn size(&self, el: &Element, name: &str, default: u64) -> R<u64> {
        let Some(a) = el.attr(name) else {
            return Ok(default);
        };
        units::size(&a.value).map_err(|e| self.unit_error(el, a, e))
    }

    /// One of `options`, `default` when absent; a near miss gets a suggestion, and `aliases`
    /// map common synonyms (`yes` → `on`) to a suggestion too.
    pub fn choice<'c>(
        &self,
        el: &Element,
        name: &str,
        options: &[&'c str],
        default: &'c str,
        aliases: &[(&str, &str)],
    ) -> R<&'c str> {
        let Some(a) = el.attr(name) else {
            return Ok(default);
        };
        if let Some(o) = options.iter().find(|o| **o == a.value) {
            return Ok(o);
        }
        let lower = a.value.trim().to_ascii_lowercase();
        let sugg = aliases
            .iter()
            .find(|(alias, _)| *alias == lower)
            .map(|(_, to)| *to)
            .or_else(|| options.iter().find(|o| **o == lower).copied())
            .or_else(|| nearest(&a.value, options.iter().copied()));
        Err(self.bad(el, a, one_of(options)).with_suggestion(sugg))
    }

    /// A whole number between `min` and `max`, `default` when absent (required when `None`).
    pub fn number<T>(&self, el: &Element, name: &str, default: Option<T>, min: T, max: T) -> R<T>
    where
        T: FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let expected = format!("a whole number from {min} to {max}");
        let a = match (el.attr(name), default) {
            (Some(a), _) => a,
            (None, Some(d)) => return Ok(d),
            (None, None) => return Err(ConfigError::missing_attr(self.file, el.line, &el.name, name, expected)),
        };
        let v = a.value.trim();
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.bad(el, a, expected));
        }
        match v.parse::<T>() {
            Ok(n) if n >= min && n <= max => Ok(n),
            _ => Err(self.bad(el, a, expected)),
        }
    }

    /// An IP address attribute value.
    pub fn ip(&self, el: &Element, a: &Attr, expected: &str) -> R<IpAddr> {
        IpAddr::from_str(a.value.trim()).map_err(|_| self.bad(el, a, expected))
    }

    /// The attribute `name` must exist and match `valid`.
    pub fn name(&self, el: &Element, name: &str, valid: fn(&str) -> bool, expected: &str) -> R<String> {
        let a = self.req(el, name, expected)?;
        if valid(&a.value) {
            Ok(a.value.clone())
        } else {
            Err(self.bad(el, a, expected))
        }
    }
}

/// `a, b or c` for value lists in messages.
pub(crate) fn one_of(options: &[&str]) -> String {
    match options {
        [] => "nothing".to_string(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}
