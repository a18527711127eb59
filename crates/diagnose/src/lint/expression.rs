//! GitHub Actions expressions (`${{ … }}`) inside a value, evaluated as far as the value's
//! shape needs: `format('…', args)` and `cond && 'text' || ''` become their text, with
//! what is only known at run time kept as `${{ … }}` (which the rules read as a
//! wildcard).

/// The value with its expressions evaluated; `None` when one of them builds text in a way
/// this does not follow (its shape is then unknown).
pub(crate) fn evaluate(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${{") {
        let body_start = start + 3;
        let Some(len) = rest.get(body_start..).and_then(closing) else {
            break;
        };
        out.push_str(rest.get(..start)?);
        out.push_str(&body_value(rest.get(body_start..body_start + len)?.trim())?);
        rest = rest.get(body_start + len + 2..)?;
    }
    out.push_str(rest);
    Some(out)
}

/// `text` split at each comma outside expressions.
pub(crate) fn split_commas(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut depth = 0usize;
    let bytes = text.as_bytes();
    for (at, &byte) in bytes.iter().enumerate() {
        match byte {
            b'{' if at >= 2 && bytes.get(at - 2..=at) == Some(b"${{".as_slice()) => depth += 1,
            b'}' if depth > 0 && bytes.get(at + 1) == Some(&b'}') => depth -= 1,
            b',' if depth == 0 => {
                parts.extend(text.get(start..at));
                start = at + 1;
            }
            _ => {}
        }
    }
    parts.extend(text.get(start..));
    parts
}

/// Where the `}}` that closes an expression starts, outside string literals.
fn closing(body: &str) -> Option<usize> {
    let mut quoted = false;
    let bytes = body.as_bytes();
    for (at, &byte) in bytes.iter().enumerate() {
        match byte {
            b'\'' => quoted = !quoted,
            b'}' if !quoted && bytes.get(at + 1) == Some(&b'}') => return Some(at),
            _ => {}
        }
    }
    None
}

fn body_value(body: &str) -> Option<String> {
    if let Some(at) = body.find("format(") {
        return format_call(body.get(at + "format(".len()..)?);
    }
    if body.contains("&&") || body.contains("||") {
        return branch(body);
    }
    // A value known at run time (`github.sha`, `hashFiles('a')`): a wildcard.
    Some(format!("${{{{ {body} }}}}"))
}

/// `format('{0}-{1}', a, 'b')` from just after `format(`: the template with each argument
/// put in its place (a literal as its text, anything else as `${{ arg }}`).
fn format_call(call: &str) -> Option<String> {
    let (template, mut rest) = literal(call.trim_start())?;
    let mut args = Vec::new();
    loop {
        rest = rest.trim_start();
        if rest.starts_with(')') {
            break;
        }
        rest = rest.strip_prefix(',')?.trim_start();
        let end = argument_end(rest)?;
        let arg = rest.get(..end)?.trim();
        args.push(match literal(arg) {
            Some((text, tail)) if tail.trim().is_empty() => text,
            _ => format!("${{{{ {arg} }}}}"),
        });
        rest = rest.get(end..)?;
    }
    let mut out = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let index: String = chars.by_ref().take_while(|c| *c != '}').collect();
                out.push_str(args.get(index.trim().parse::<usize>().ok()?)?);
            }
            _ => out.push(c),
        }
    }
    Some(out)
}

/// A string literal at the start of `text` (`'it''s'`), and what follows it.
fn literal(text: &str) -> Option<(String, &str)> {
    let mut rest = text.strip_prefix('\'')?;
    let mut value = String::new();
    loop {
        let end = rest.find('\'')?;
        value.push_str(rest.get(..end)?);
        rest = rest.get(end + 1..)?;
        match rest.strip_prefix('\'') {
            Some(after) => {
                value.push('\'');
                rest = after;
            }
            None => return Some((value, rest)),
        }
    }
}

/// Where an argument ends: the `,` or `)` at its own depth, outside literals.
fn argument_end(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut quoted = false;
    for (at, c) in text.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth == 0 => return Some(at),
            ')' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => return Some(at),
            _ => {}
        }
    }
    None
}

/// `cond && 'text' || 'other'`: the first non-empty literal given as a branch (after
/// `&&` or `||`), which is the value whenever the expression gives one; `None` when no
/// branch is a literal (`a || b`).
fn branch(body: &str) -> Option<String> {
    let mut branches = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.find(['&', '|']) {
        let after = rest.get(at..)?;
        let operator = after.starts_with("&&") || after.starts_with("||");
        rest = after.get(if operator { 2 } else { 1 }..)?;
        if operator && let Some((text, tail)) = literal(rest.trim_start()) {
            branches.push(text);
            rest = tail;
        }
    }
    let chosen = branches
        .iter()
        .find(|b| !b.is_empty())
        .or(branches.first())?;
    Some(chosen.clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn format_calls_become_their_text() {
        assert_eq!(
            evaluate(
                "${{ github.event_name != 'pull_request' && format('type=registry,mode=max,\
                 ref={0}/{1}/cache/app:{2}-{3}', env.REGISTRY, steps.repo.outputs.name, \
                 steps.ref.outputs.name, matrix.arch) || '' }}"
            )
            .unwrap(),
            "type=registry,mode=max,ref=${{ env.REGISTRY }}/${{ steps.repo.outputs.name }}\
             /cache/app:${{ steps.ref.outputs.name }}-${{ matrix.arch }}"
        );
        assert_eq!(
            evaluate("${{ format('{0}.cache-to=type=gha,scope={{x}}', 'app') }}").unwrap(),
            "app.cache-to=type=gha,scope={x}"
        );
    }

    #[test]
    fn conditional_literals_give_the_branch_that_has_text() {
        assert_eq!(
            evaluate("${{ github.ref == 'refs/heads/main' && 'type=gha,mode=max' || '' }}")
                .unwrap(),
            "type=gha,mode=max"
        );
        assert_eq!(
            evaluate("ref=r:${{ matrix.arch }}").unwrap(),
            "ref=r:${{ matrix.arch }}"
        );
        assert_eq!(
            evaluate("type=gha,scope=${{ hashFiles('a, b') }},mode=max").unwrap(),
            "type=gha,scope=${{ hashFiles('a, b') }},mode=max"
        );
        assert_eq!(evaluate("${{ inputs.a || inputs.b }}"), None);
    }

    #[test]
    fn lists_split_outside_expressions() {
        assert_eq!(
            split_commas("a, ${{ fromJSON('[1,2]') }},b"),
            vec!["a", " ${{ fromJSON('[1,2]') }}", "b"]
        );
    }
}
