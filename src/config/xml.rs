//! A tiny element tree built with quick-xml's event reader, keeping the line of every element
//! and attribute so that validation errors can point at them.

use std::path::Path;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::error::ConfigError;

/// Deeper nesting than this is refused (the schemas need 4 levels); it also keeps recursive
/// code over the tree bounded.
const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attr {
    pub name: String,
    pub value: String,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Element {
    pub name: String,
    pub line: usize,
    pub attrs: Vec<Attr>,
    pub children: Vec<Element>,
}

impl Element {
    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.attrs.iter().find(|a| a.name == name)
    }
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
}

/// Maps byte offsets to 1-based line numbers.
pub(crate) struct Lines {
    starts: Vec<usize>,
    len: usize,
}

impl Lines {
    pub fn new(text: &str) -> Lines {
        let mut starts = vec![0];
        starts.extend(text.bytes().enumerate().filter(|(_, b)| *b == b'\n').map(|(i, _)| i + 1));
        Lines { starts, len: text.len() }
    }
    pub fn line(&self, offset: usize) -> usize {
        let offset = offset.min(self.len);
        match self.starts.binary_search(&offset) {
            Ok(i) => i + 1,
            Err(i) => i.max(1),
        }
    }
    pub fn line_u64(&self, offset: u64) -> usize {
        self.line(usize::try_from(offset).unwrap_or(usize::MAX))
    }
}

/// Where `part` (a slice borrowed from `text`) starts in `text`, if it does.
fn offset_in(text: &str, part: &[u8]) -> Option<usize> {
    let base = text.as_ptr() as usize;
    let p = part.as_ptr() as usize;
    p.checked_sub(base).filter(|o| *o <= text.len())
}

/// Decodes a UTF-8 file, reporting the line of the first invalid byte.
pub(crate) fn decode(bytes: &[u8], file: &Path) -> Result<String, ConfigError> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_string()),
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let line = 1 + valid.iter().filter(|b| **b == b'\n').count();
            Err(ConfigError::xml(file, line, "the file is not UTF-8 text (save it as UTF-8)".to_string()))
        }
    }
}

/// Parses `text` into its root element. `root` is the expected root name, used only in the
/// messages for an empty file or a second root.
pub(crate) fn parse(text: &str, file: &Path, root: &str) -> Result<Element, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines = Lines::new(text);
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Element> = Vec::new();
    let mut top: Option<Element> = None;
    loop {
        let before = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
        let event = match reader.read_event() {
            Ok(ev) => ev,
            Err(e) => return Err(ConfigError::xml(file, lines.line_u64(reader.error_position()), e.to_string())),
        };
        match event {
            Event::Start(e) => {
                let el = open(&e, text, &lines, file, before)?;
                if stack.len() >= MAX_DEPTH {
                    return Err(ConfigError::xml(
                        file,
                        el.line,
                        format!("<{}> is nested more than {MAX_DEPTH} levels deep", el.name),
                    ));
                }
                stack.push(el);
            }
            Event::Empty(e) => {
                let el = open(&e, text, &lines, file, before)?;
                attach(el, &mut stack, &mut top, file, root)?;
            }
            Event::End(_) => {
                // quick-xml checks that the end tag matches the open one.
                if let Some(el) = stack.pop() {
                    attach(el, &mut stack, &mut top, file, root)?;
                }
            }
            Event::Text(t) => {
                let raw: &[u8] = &t;
                if let Some(i) = raw.iter().position(|b| !b.is_ascii_whitespace()) {
                    let line = lines.line(before.saturating_add(i));
                    let shown: String =
                        String::from_utf8_lossy(&raw[i..]).chars().take_while(|c| *c != '\n').take(40).collect();
                    let shown = shown.trim_end();
                    return Err(ConfigError::xml(
                        file,
                        line,
                        match stack.last() {
                            Some(p) => {
                                format!("<{}> takes only child elements and attributes, found text \"{shown}\"", p.name)
                            }
                            None => format!("text outside the root element: \"{shown}\""),
                        },
                    ));
                }
            }
            Event::CData(_) => {
                return Err(ConfigError::xml(file, lines.line(before), "CDATA sections are not used in this file"));
            }
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
            Event::Eof => break,
        }
    }
    if let Some(open) = stack.last() {
        return Err(ConfigError::xml(
            file,
            lines.line(text.len()),
            format!("the file ends before <{}> (line {}) is closed", open.name, open.line),
        ));
    }
    top.ok_or_else(|| {
        ConfigError::xml(file, lines.line(text.len()), format!("the file has no root element, expected <{root}>"))
    })
}

fn open(e: &BytesStart<'_>, text: &str, lines: &Lines, file: &Path, before: usize) -> Result<Element, ConfigError> {
    let name_bytes = e.name();
    let name = String::from_utf8_lossy(name_bytes.as_ref()).into_owned();
    let el_offset = offset_in(text, name_bytes.as_ref()).unwrap_or(before);
    let line = lines.line(el_offset);
    let mut attrs = Vec::new();
    for a in e.attributes() {
        let a = match a {
            Ok(a) => a,
            Err(err) => return Err(ConfigError::xml(file, line, format!("<{name}>: bad attribute syntax: {err}"))),
        };
        let key = a.key.as_ref();
        let aname = String::from_utf8_lossy(key).into_owned();
        let aline = offset_in(text, key).map(|o| lines.line(o)).unwrap_or(line);
        let value = match a.unescape_value() {
            Ok(v) => v.into_owned(),
            Err(err) => return Err(ConfigError::xml(file, aline, format!("<{name}> attribute \"{aname}\": {err}"))),
        };
        attrs.push(Attr { name: aname, value, line: aline });
    }
    Ok(Element { name, line, attrs, children: Vec::new() })
}

fn attach(
    el: Element,
    stack: &mut [Element],
    top: &mut Option<Element>,
    file: &Path,
    root: &str,
) -> Result<(), ConfigError> {
    if let Some(parent) = stack.last_mut() {
        parent.children.push(el);
        return Ok(());
    }
    if let Some(first) = top {
        return Err(ConfigError::xml(
            file,
            el.line,
            format!(
                "a second root element <{}> after <{}> (line {}); the file has one root element <{root}>",
                el.name, first.name, first.line
            ),
        ));
    }
    *top = Some(el);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_with_lines() {
        let text = "<?xml version=\"1.0\"?>\n<a x=\"1\">\n  <b\n   y=\"&amp;2\"/>\n</a>\n";
        let root = parse(text, Path::new("f.xml"), "a").unwrap();
        assert_eq!(root.name, "a");
        assert_eq!(root.line, 2);
        assert_eq!(root.attrs[0], Attr { name: "x".into(), value: "1".into(), line: 2 });
        assert_eq!(root.children[0].line, 3);
        assert_eq!(root.children[0].attrs[0].line, 4);
        assert_eq!(root.children[0].attrs[0].value, "&2");
    }

    #[test]
    fn malformed() {
        let e = parse("<a>\n<b>\n</a>", Path::new("f.xml"), "a").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        let e = parse("<a>\n<b>", Path::new("f.xml"), "a").unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
        let e = parse("", Path::new("f.xml"), "a").unwrap_err();
        assert!(e.to_string().contains("no root element"), "{e}");
        let e = parse("<a/>\n<a/>", Path::new("f.xml"), "a").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let e = parse("<a>\n hello</a>", Path::new("f.xml"), "a").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let e = parse("<a x=\"1\" x=\"2\"/>", Path::new("f.xml"), "a").unwrap_err();
        assert!(e.to_string().contains("duplicated"), "{e}");
    }
}
