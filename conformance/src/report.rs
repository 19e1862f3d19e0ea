//! Results of a conformance run.

use std::collections::BTreeMap;

use serde::Serialize;

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The plugin behaved as required.
    Passed,
    /// It did not; the string says what was observed.
    Failed(String),
    /// The check does not apply, because of the named declared capability.
    Unsupported(String),
}

/// The result of a whole run; serialises to the `--json` form
/// `{"plugin":…,"version":…,"fixture":…,"passed":[…],"failed":[…],"unsupported":[…],"details":{…}}`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Plugin name.
    pub plugin: String,
    /// Plugin version.
    pub version: String,
    /// Fixture used.
    pub fixture: String,
    /// Names of passed checks.
    pub passed: Vec<String>,
    /// Names of failed checks.
    pub failed: Vec<String>,
    /// Names of checks that do not apply to the declared capabilities.
    pub unsupported: Vec<String>,
    /// Why each failed or unsupported check came out that way.
    pub details: BTreeMap<String, String>,
}

impl Report {
    /// Records one outcome.
    pub fn record(&mut self, name: &str, outcome: Outcome) {
        match outcome {
            Outcome::Passed => self.passed.push(name.to_owned()),
            Outcome::Failed(why) => {
                self.failed.push(name.to_owned());
                self.details.insert(name.to_owned(), why);
            }
            Outcome::Unsupported(why) => {
                self.unsupported.push(name.to_owned());
                self.details.insert(name.to_owned(), why);
            }
        }
    }

    /// Whether anything failed.
    pub fn any_failed(&self) -> bool {
        !self.failed.is_empty()
    }

    /// The human-readable form.
    pub fn to_text(&self) -> String {
        let mut s = format!("{} {} (fixture {})\n", self.plugin, self.version, self.fixture);
        for n in &self.passed {
            s.push_str(&format!("  passed       {n}\n"));
        }
        for n in &self.unsupported {
            s.push_str(&format!("  unsupported  {n}: {}\n", self.details.get(n).map(String::as_str).unwrap_or("")));
        }
        for n in &self.failed {
            s.push_str(&format!("  FAILED       {n}: {}\n", self.details.get(n).map(String::as_str).unwrap_or("")));
        }
        s.push_str(&format!(
            "{} passed, {} failed, {} unsupported\n",
            self.passed.len(),
            self.failed.len(),
            self.unsupported.len()
        ));
        s
    }
}
