//! Forms and query strings (`application/x-www-form-urlencoded`), bounded: every value, the number of fields
//! and (in [`super::routes`]) the whole body have limits, so that no request makes the portal hold or send
//! to PostgreSQL more than a page needs.

use percent_encoding::percent_decode_str;

/// Longest value of one field, decoded (an endpoint URL is at most 2048 characters in SQL too).
pub(super) const MAX_FIELD: usize = 2048;
/// Most fields in one form or query string.
pub(super) const MAX_FIELDS: usize = 200;

/// Why a form was refused: shown to the person who sent it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Refused(pub String);

#[derive(Debug, Default)]
pub(super) struct Form {
    fields: Vec<(String, String)>,
}

impl Form {
    pub(super) fn parse(text: &str) -> Result<Form, Refused> {
        let mut fields = Vec::new();
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            if fields.len() == MAX_FIELDS {
                return Err(Refused(format!(
                    "the form has more than {MAX_FIELDS} fields"
                )));
            }
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode(name)?;
            let value = decode(value)?;
            if value.len() > MAX_FIELD || name.len() > 100 {
                return Err(Refused(format!(
                    "the field {:?} is longer than {MAX_FIELD} bytes",
                    name.chars().take(100).collect::<String>()
                )));
            }
            fields.push((name, value));
        }
        Ok(Form { fields })
    }

    /// The first value of `name`, trimmed; `None` when absent or blank.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// Every non-blank value of `name` (checkboxes), trimmed.
    pub(super) fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }
}

fn decode(text: &str) -> Result<String, Refused> {
    let spaced = text.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| Refused("the form is not UTF-8".into()))
}

/// Percent-encodes a value for a query string.
pub(super) fn encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_bounds() {
        let form = Form::parse("a=1+2&b=%C3%A9&c=&c=x&a=3&flag").unwrap();
        assert_eq!(form.get("a"), Some("1 2"));
        assert_eq!(form.get("b"), Some("é"));
        assert_eq!(form.all("c").collect::<Vec<_>>(), vec!["x"]);
        assert_eq!(form.get("flag"), None);
        assert_eq!(form.get("missing"), None);
        let long = format!("url={}", "a".repeat(MAX_FIELD + 1));
        assert!(Form::parse(&long)
            .unwrap_err()
            .0
            .contains("\"url\" is longer"));
        assert!(Form::parse(&format!("url={}", "a".repeat(MAX_FIELD))).is_ok());
        let many = vec!["x=1"; MAX_FIELDS + 1].join("&");
        assert!(Form::parse(&many).is_err());
        assert!(Form::parse("a=%FF").is_err());
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }
}
