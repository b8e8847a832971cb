//! Statement helpers: every template is written once with `?` placeholders, and PostgreSQL gets
//! it renumbered to `$n`. No template may contain a literal `?`.

use std::borrow::Cow;

use sea_orm::{DbBackend, Statement, Value};

/// Builds a statement for `backend` from a `?`-placeholder template.
pub(crate) fn stmt(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(backend, for_backend(backend, sql).into_owned(), values)
}

/// The template with PostgreSQL's `$n` placeholders where needed.
pub(crate) fn for_backend(backend: DbBackend, sql: &str) -> Cow<'_, str> {
    match backend {
        DbBackend::Postgres => Cow::Owned(number_placeholders(sql)),
        _ => Cow::Borrowed(sql),
    }
}

/// `?, ?, ?` for `n` values.
pub(crate) fn placeholders(n: usize) -> String {
    let mut s = String::with_capacity(n * 3);
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        s.push('?');
    }
    s
}

fn number_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renumbers_for_postgres_only() {
        let pg = stmt(DbBackend::Postgres, "a = ? AND b IN (?, ?)", vec![]);
        assert_eq!(pg.sql, "a = $1 AND b IN ($2, $3)");
        let my = stmt(DbBackend::MySql, "a = ?", vec![]);
        assert_eq!(my.sql, "a = ?");
        assert_eq!(placeholders(3), "?, ?, ?");
        assert_eq!(placeholders(0), "");
    }
}
