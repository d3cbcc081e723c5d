//! What a manifest may name on disk, checked once when the manifest is read.
//!
//! A manifest comes from the repository, and restore joins its paths to the data directory. A
//! path that could lead anywhere else (`..`, an absolute path, an empty or `.` component, a NUL
//! or a backslash) is refused when the manifest is parsed, so a bad manifest is refused as a
//! whole before anything is written. Tablespace locations, the one place a manifest may point
//! outside the data directory, must be absolute and clean, and follow a numeric OID.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A file or directory of a backup: relative to the data directory, `/`-separated, with no
/// empty, `.` or `..` component, no NUL and no backslash. Joined to a data directory it names
/// something below it, unless a component on the way is a symbolic link, which restore checks
/// as it writes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ManifestPath(String);

/// Why a path is not a clean relative path inside the data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    #[error("it is empty")]
    Empty,
    #[error("it is absolute")]
    Absolute,
    #[error("it has an empty component")]
    EmptyComponent,
    #[error("it has a '.' component")]
    CurrentDirectory,
    #[error("it has a '..' component")]
    ParentDirectory,
    #[error("it contains a NUL byte")]
    Nul,
    #[error("it contains a backslash")]
    Backslash,
}

/// A path a manifest lists that is refused, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "lists the path '{}', which is not a clean relative path inside the data directory: {problem}",
    path.escape_debug()
)]
pub struct RefusedPath {
    pub path: String,
    pub problem: PathProblem,
}

impl ManifestPath {
    pub fn parse(text: &str) -> Result<Self, RefusedPath> {
        problem_with(text)
            .map(|problem| {
                Err(RefusedPath {
                    path: text.to_string(),
                    problem,
                })
            })
            .unwrap_or_else(|| Ok(ManifestPath(text.to_string())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path's components, first to last; never empty, `.` or `..`.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

/// The first thing that makes `text` other than a clean relative path, if any.
fn problem_with(text: &str) -> Option<PathProblem> {
    if text.is_empty() {
        return Some(PathProblem::Empty);
    }
    if text.contains('\0') {
        return Some(PathProblem::Nul);
    }
    if text.contains('\\') {
        return Some(PathProblem::Backslash);
    }
    if text.starts_with('/') {
        return Some(PathProblem::Absolute);
    }
    text.split('/').find_map(|component| match component {
        "" => Some(PathProblem::EmptyComponent),
        "." => Some(PathProblem::CurrentDirectory),
        ".." => Some(PathProblem::ParentDirectory),
        _ => None,
    })
}

impl TryFrom<String> for ManifestPath {
    type Error = RefusedPath;

    fn try_from(text: String) -> Result<Self, RefusedPath> {
        match problem_with(&text) {
            Some(problem) => Err(RefusedPath {
                path: text,
                problem,
            }),
            None => Ok(ManifestPath(text)),
        }
    }
}

impl From<ManifestPath> for String {
    fn from(path: ManifestPath) -> String {
        path.0
    }
}

impl fmt::Display for ManifestPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for ManifestPath {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

/// One tablespace of a backup, as `pg_backup_stop`'s tablespace_map lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tablespace {
    pub oid: u32,
    /// Absolute, with no empty, `.` or `..` component and no NUL or backslash.
    pub location: PathBuf,
}

/// `tablespace_map` as the manifest stores it (`<oid> <location>` per line), every line checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TablespaceMap {
    text: String,
    entries: Vec<Tablespace>,
}

/// A tablespace_map line that is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "lists the tablespace '{}', which is not an OID and a clean absolute location",
    line.escape_debug()
)]
pub struct RefusedTablespace {
    pub line: String,
}

impl TablespaceMap {
    pub fn parse(text: &str) -> Result<Self, RefusedTablespace> {
        let entries = text
            .lines()
            .map(|line| {
                tablespace_of(line).ok_or_else(|| RefusedTablespace {
                    line: line.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TablespaceMap {
            text: text.to_string(),
            entries,
        })
    }

    pub fn entries(&self) -> &[Tablespace] {
        &self.entries
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// `<oid> <location>`. Postgres escapes a backslash or line break in a location with a
/// backslash; such a location is refused rather than guessed at.
fn tablespace_of(line: &str) -> Option<Tablespace> {
    let (oid, location) = line.split_once(' ')?;
    if oid.is_empty() || !oid.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let relative = location.strip_prefix('/')?;
    if problem_with(relative).is_some() {
        return None;
    }
    Some(Tablespace {
        oid: oid.parse().ok()?,
        location: PathBuf::from(location),
    })
}

impl TryFrom<String> for TablespaceMap {
    type Error = RefusedTablespace;

    fn try_from(text: String) -> Result<Self, RefusedTablespace> {
        TablespaceMap::parse(&text)
    }
}

impl From<TablespaceMap> for String {
    fn from(map: TablespaceMap) -> String {
        map.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A component a clean path may have: any characters but `/`, NUL and backslash, and not
    /// `.` or `..`.
    fn clean_component() -> impl Strategy<Value = String> {
        "[^/\\\\\u{0}]{1,12}".prop_filter("not . or ..", |component| {
            component != "." && component != ".."
        })
    }

    fn clean_path() -> impl Strategy<Value = String> {
        prop::collection::vec(clean_component(), 1..6).prop_map(|components| components.join("/"))
    }

    /// Components a path can be built from, clean or not.
    fn any_component() -> impl Strategy<Value = String> {
        prop_oneof![
            clean_component(),
            Just(String::new()),
            Just(".".to_string()),
            Just("..".to_string()),
            "[a-z]{0,3}\u{0}[a-z]{0,3}",
            "[a-z]{0,3}\\\\[a-z.]{0,3}",
        ]
    }

    /// Whether `text` is a clean relative path, decided component by component.
    fn is_clean(text: &str) -> bool {
        !text.is_empty()
            && text.split('/').all(|component| {
                !component.is_empty()
                    && component != "."
                    && component != ".."
                    && !component.contains('\0')
                    && !component.contains('\\')
            })
    }

    proptest! {
        #[test]
        fn every_clean_path_round_trips(text in clean_path()) {
            let path = ManifestPath::parse(&text).unwrap();
            prop_assert_eq!(path.as_str(), text.as_str());
            let again = ManifestPath::parse(&path.to_string()).unwrap();
            prop_assert_eq!(&again, &path);
            let json = serde_json::to_string(&path).unwrap();
            prop_assert_eq!(serde_json::from_str::<ManifestPath>(&json).unwrap(), path);
        }

        #[test]
        fn a_path_that_is_not_clean_is_refused(
            components in prop::collection::vec(any_component(), 0..6),
            leading_slash in any::<bool>(),
        ) {
            let text = format!("{}{}", if leading_slash { "/" } else { "" }, components.join("/"));
            let parsed = ManifestPath::parse(&text);
            prop_assert_eq!(parsed.is_ok(), is_clean(&text), "{:?}", text);
            if let Ok(path) = parsed {
                // Joined to a directory, a clean path stays below it.
                let joined = std::path::Path::new("/data").join(path.as_str());
                prop_assert!(joined.starts_with("/data"));
                prop_assert!(joined.components().all(|component| matches!(
                    component,
                    std::path::Component::RootDir | std::path::Component::Normal(_)
                )));
            }
        }
    }

    #[test]
    fn each_kind_of_bad_path_is_named() {
        let problem = |text: &str| ManifestPath::parse(text).unwrap_err().problem;
        assert_eq!(problem(""), PathProblem::Empty);
        assert_eq!(problem("/etc/passwd"), PathProblem::Absolute);
        assert_eq!(problem("base//1"), PathProblem::EmptyComponent);
        assert_eq!(problem("base/"), PathProblem::EmptyComponent);
        assert_eq!(problem("./base"), PathProblem::CurrentDirectory);
        assert_eq!(problem("base/../../x"), PathProblem::ParentDirectory);
        assert_eq!(problem("base/1\0x"), PathProblem::Nul);
        assert_eq!(problem("base\\..\\x"), PathProblem::Backslash);
        assert_eq!(
            ManifestPath::parse("../x").unwrap_err().to_string(),
            "lists the path '../x', which is not a clean relative path inside the data directory: it has a '..' component"
        );
    }

    #[test]
    fn a_tablespace_needs_an_oid_and_a_clean_absolute_location() {
        let map = TablespaceMap::parse("16390 /srv/tablespace one\n16391 /srv/two\n").unwrap();
        assert_eq!(
            map.entries(),
            [
                Tablespace {
                    oid: 16390,
                    location: PathBuf::from("/srv/tablespace one")
                },
                Tablespace {
                    oid: 16391,
                    location: PathBuf::from("/srv/two")
                }
            ]
        );
        for line in [
            "16390 relative",
            "16390 /srv/../etc",
            "16390 /srv//x",
            "16390 /",
            "x16390 /srv",
            "-1 /srv",
            "16390",
            "99999999999 /srv",
            "16390 /srv\\/x",
        ] {
            assert!(TablespaceMap::parse(line).is_err(), "{line}");
        }
    }
}
