//! The client contract cannot drift from the code: `docs/api.md`'s error table lists exactly the
//! codes of `ErrorCode`, in its order, each with the status the code answers with.

use kleingate_protocol::ErrorCode;

#[test]
fn docs_error_table_lists_every_code_with_its_status() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md");
    let doc = std::fs::read_to_string(path).expect("docs/api.md");
    let mut lines = doc
        .lines()
        .skip_while(|l| l.trim() != "| status | code | when |");
    assert!(
        lines.next().is_some(),
        "no `| status | code | when |` table in docs/api.md"
    );
    let rows: Vec<(u16, String)> = lines
        .skip(1) // the |---| line
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let status = cells[1]
                .parse()
                .unwrap_or_else(|_| panic!("status `{}` in: {l}", cells[1]));
            let code = cells[2].trim_matches('`').to_owned();
            (status, code)
        })
        .collect();
    let expected: Vec<(u16, String)> = ErrorCode::ALL
        .iter()
        .map(|c| (c.status(), c.as_str().to_owned()))
        .collect();
    for (status, code) in &rows {
        match ErrorCode::from_wire(code) {
            None => panic!("docs/api.md lists `{code}`, which the code never answers with"),
            Some(c) => assert_eq!(c.status(), *status, "`{code}`: docs say {status}"),
        }
    }
    for (status, code) in &expected {
        assert!(
            rows.iter().any(|(_, c)| c == code),
            "`{code}` ({status}) is missing from docs/api.md's error table"
        );
    }
    assert_eq!(
        rows, expected,
        "the table's order differs from ErrorCode::ALL"
    );
}
