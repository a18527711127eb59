//! A Dockerfile parser that follows BuildKit's syntax: parser directives (`# syntax=`,
//! `# escape=`, `# check=`) only before anything else, line continuation with the escape
//! character (comment and blank lines inside a continued instruction skipped), heredocs
//! (`<<EOF`, `<<-EOF`, quoted delimiters) on RUN, COPY and ADD, JSON-array and shell forms,
//! `--flag=value` options, and case-insensitive keywords. It rejects what BuildKit
//! rejects (unknown instructions, unterminated heredocs, a bad escape directive, a FROM
//! without an image) with the line, never a panic.

/// A parsed Dockerfile.
#[derive(Clone, Debug, Default)]
pub(crate) struct Dockerfile {
    /// The escape character (`\` unless `# escape=` says otherwise).
    pub escape: char,
    /// The `# syntax=` directive, if any.
    pub syntax: Option<String>,
    /// The instructions in order.
    pub instructions: Vec<Instruction>,
}

/// One instruction, with its continuation lines joined.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Instruction {
    /// The keyword in upper case (`RUN`, `COPY`, ...).
    pub keyword: String,
    /// The line (1-based) the keyword is on.
    pub line: usize,
    /// Leading `--name[=value]` options.
    pub flags: Vec<Flag>,
    /// What follows the options.
    pub args: Args,
    /// Heredocs, in the order they were opened.
    pub heredocs: Vec<Heredoc>,
}

/// A `--name[=value]` option of an instruction.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Flag {
    /// The name without the dashes.
    pub name: String,
    /// The value after `=`, if any.
    pub value: Option<String>,
}

/// The arguments of an instruction.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Args {
    /// `["a", "b"]`.
    Json(Vec<String>),
    /// Anything else, as written (continuations joined).
    Shell(String),
}

/// A heredoc opened by an instruction.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Heredoc {
    /// The delimiter word.
    pub name: String,
    /// The lines between the instruction and the delimiter.
    pub body: String,
}

/// Why a Dockerfile does not parse, and where.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ParseError {
    /// The line (1-based).
    pub line: usize,
    /// What is wrong, as BuildKit would say it.
    pub message: String,
}

const KEYWORDS: [&str; 18] = [
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

const JSON_FORMS: [&str; 8] = [
    "RUN",
    "CMD",
    "ENTRYPOINT",
    "COPY",
    "ADD",
    "SHELL",
    "VOLUME",
    "HEALTHCHECK",
];

impl Instruction {
    /// Whether the instruction is `keyword` (upper case).
    pub fn is(&self, keyword: &str) -> bool {
        self.keyword == keyword
    }

    /// The value of option `--name`, if given.
    pub fn flag(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value.as_deref().unwrap_or(""))
    }

    /// The arguments split into words (a JSON array's items, or the shell form split on
    /// whitespace outside quotes).
    pub fn words(&self) -> Vec<String> {
        match &self.args {
            Args::Json(items) => items.clone(),
            Args::Shell(text) => split_words(text),
        }
    }

    /// The command text a RUN executes: the shell form or the JSON items joined, and the
    /// heredoc bodies.
    pub fn command_text(&self) -> String {
        let mut text = match &self.args {
            Args::Json(items) => items.join(" "),
            Args::Shell(text) => text.clone(),
        };
        for heredoc in &self.heredocs {
            text.push('\n');
            text.push_str(&heredoc.body);
        }
        text
    }
}

/// Parses a Dockerfile.
pub(crate) fn parse(text: &str) -> Result<Dockerfile, ParseError> {
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let mut file = Dockerfile {
        escape: '\\',
        ..Dockerfile::default()
    };
    let mut index = directives(&lines, &mut file)?;
    let mut seen_from = false;
    while let Some(&first) = lines.get(index) {
        let start = index + 1;
        if is_blank_or_comment(first) {
            index += 1;
            continue;
        }
        // Join continuation lines; comment and blank lines inside are skipped.
        let mut logical = String::new();
        let mut current = first;
        index += 1;
        loop {
            match strip_continuation(current, file.escape) {
                Some(head) => {
                    logical.push_str(head);
                    let mut next = None;
                    while let Some(&line) = lines.get(index) {
                        index += 1;
                        if is_comment(line) || line.trim().is_empty() {
                            continue;
                        }
                        next = Some(line);
                        break;
                    }
                    match next {
                        Some(line) => current = line,
                        None => break,
                    }
                }
                None => {
                    logical.push_str(current);
                    break;
                }
            }
        }
        let mut instruction = instruction(&logical, start)?;
        if matches!(instruction.keyword.as_str(), "RUN" | "COPY" | "ADD")
            && let Args::Shell(args) = &instruction.args
        {
            for (name, strip_tabs) in heredoc_markers(args) {
                let mut body = Vec::new();
                let mut closed = false;
                while let Some(&line) = lines.get(index) {
                    index += 1;
                    let candidate = if strip_tabs {
                        line.trim_start_matches('\t')
                    } else {
                        line
                    };
                    if candidate == name {
                        closed = true;
                        break;
                    }
                    body.push(candidate);
                }
                if !closed {
                    return Err(ParseError {
                        line: start,
                        message: format!(
                            "unterminated heredoc <<{name}: no line `{name}` closes it before \
                             the end of the file"
                        ),
                    });
                }
                instruction.heredocs.push(Heredoc {
                    name,
                    body: body.join("\n"),
                });
            }
        }
        if instruction.is("FROM") {
            seen_from = true;
        } else if !seen_from && !instruction.is("ARG") {
            return Err(ParseError {
                line: start,
                message: format!(
                    "{} before the first FROM: only ARG may come before FROM (no build stage \
                     in current context)",
                    instruction.keyword
                ),
            });
        }
        file.instructions.push(instruction);
    }
    if file.instructions.is_empty() {
        return Err(ParseError {
            line: 1,
            message: "file with no instructions".to_owned(),
        });
    }
    if !seen_from {
        return Err(ParseError {
            line: 1,
            message: "no FROM instruction: a Dockerfile needs at least one stage".to_owned(),
        });
    }
    Ok(file)
}

/// Reads the parser directives at the top; returns the index of the first line after them.
fn directives(lines: &[&str], file: &mut Dockerfile) -> Result<usize, ParseError> {
    let mut seen: Vec<String> = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let Some((key, value)) = directive(line) else {
            return Ok(index);
        };
        if seen.contains(&key) {
            return Err(ParseError {
                line: index + 1,
                message: format!("only one {key} parser directive can be used"),
            });
        }
        match key.as_str() {
            "escape" => {
                file.escape = match value.as_str() {
                    "\\" => '\\',
                    "`" => '`',
                    _ => {
                        return Err(ParseError {
                            line: index + 1,
                            message: format!(
                                "invalid escape token '{value}' does not match ` or \\"
                            ),
                        });
                    }
                }
            }
            "syntax" => file.syntax = Some(value),
            _ => {}
        }
        seen.push(key);
    }
    Ok(lines.len())
}

/// `# key=value` for one of BuildKit's directives (`syntax`, `escape`, `check`).
fn directive(line: &str) -> Option<(String, String)> {
    let rest = line.trim_start().strip_prefix('#')?;
    let (key, value) = rest.split_once('=')?;
    let key = key.trim().to_ascii_lowercase();
    if !matches!(key.as_str(), "syntax" | "escape" | "check") || key.contains(char::is_whitespace) {
        return None;
    }
    Some((key, value.trim().to_owned()))
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

fn is_blank_or_comment(line: &str) -> bool {
    line.trim().is_empty() || is_comment(line)
}

/// The line without its trailing escape character, when it continues on the next line.
fn strip_continuation(line: &str, escape: char) -> Option<&str> {
    line.trim_end_matches([' ', '\t']).strip_suffix(escape)
}

/// Splits a logical line into keyword, options and arguments.
fn instruction(logical: &str, line: usize) -> Result<Instruction, ParseError> {
    let trimmed = logical.trim_start();
    let (keyword, rest) = trimmed
        .split_once(char::is_whitespace)
        .unwrap_or((trimmed, ""));
    let keyword = keyword.to_ascii_uppercase();
    if !KEYWORDS.contains(&keyword.as_str()) {
        return Err(ParseError {
            line,
            message: format!("unknown instruction: {keyword}"),
        });
    }
    let mut rest = rest.trim_start();
    let mut flags = Vec::new();
    while let Some(option) = rest.strip_prefix("--") {
        let end = option.find(char::is_whitespace).unwrap_or(option.len());
        let word = option.get(..end).unwrap_or(option);
        if word.is_empty() {
            break;
        }
        let (name, value) = match word.split_once('=') {
            Some((name, value)) => (name, Some(unquote(value))),
            None => (word, None),
        };
        flags.push(Flag {
            name: name.to_ascii_lowercase(),
            value,
        });
        rest = option.get(end..).unwrap_or("").trim_start();
    }
    let rest = rest.trim_end();
    let json = JSON_FORMS
        .contains(&keyword.as_str())
        .then(|| json_array(rest))
        .flatten();
    let args = match json {
        Some(items) => Args::Json(items),
        None => Args::Shell(rest.to_owned()),
    };
    let instruction = Instruction {
        keyword,
        line,
        flags,
        args,
        heredocs: Vec::new(),
    };
    if instruction.is("FROM") {
        let words = instruction.words();
        let valid = match words.as_slice() {
            [_] => true,
            [_, as_, _] => as_.eq_ignore_ascii_case("as"),
            _ => false,
        };
        if !valid {
            return Err(ParseError {
                line,
                message: format!(
                    "FROM requires either one or three arguments (`FROM image [AS name]`), got \
                     `{}`",
                    words.join(" ")
                ),
            });
        }
    }
    Ok(instruction)
}

/// `["a", "b"]` when the text is a JSON array of strings.
fn json_array(text: &str) -> Option<Vec<String>> {
    if !text.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(text).ok()
}

fn unquote(value: &str) -> String {
    let v = value.trim();
    for quote in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(quote).and_then(|s| s.strip_suffix(quote)) {
            return inner.to_owned();
        }
    }
    v.to_owned()
}

/// The heredocs a shell-form line opens: `<<EOF`, `<<-EOF`, `<<"EOF"`, `<<'EOF'`, outside
/// quotes (`<<<` is a here-string, not a heredoc). The flag says whether tabs are stripped.
fn heredoc_markers(args: &str) -> Vec<(String, bool)> {
    let chars: Vec<char> = args.chars().collect();
    let mut markers = Vec::new();
    let mut quote: Option<char> = None;
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        if c == '"' || c == '\'' {
            quote = Some(c);
            i += 1;
            continue;
        }
        if c == '<' && chars.get(i + 1) == Some(&'<') && chars.get(i + 2) != Some(&'<') {
            let previous = i.checked_sub(1).and_then(|p| chars.get(p));
            if previous == Some(&'<') {
                i += 2;
                continue;
            }
            let mut j = i + 2;
            let strip_tabs = chars.get(j) == Some(&'-');
            if strip_tabs {
                j += 1;
            }
            let mut name = String::new();
            let mut name_quote: Option<char> = None;
            if let Some(&q) = chars.get(j).filter(|&&q| q == '"' || q == '\'') {
                name_quote = Some(q);
                j += 1;
            }
            while let Some(&n) = chars.get(j) {
                match name_quote {
                    Some(q) if n == q => {
                        j += 1;
                        break;
                    }
                    Some(_) => name.push(n),
                    None if n.is_alphanumeric() || n == '_' || n == '-' || n == '.' => name.push(n),
                    None => break,
                }
                j += 1;
            }
            if !name.is_empty() {
                markers.push((name, strip_tabs));
            }
            i = j;
            continue;
        }
        i += 1;
    }
    markers
}

/// Splits shell text on whitespace outside quotes, removing the quotes.
pub(crate) fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => word.push(c),
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            None => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]
    use super::*;

    #[test]
    fn continuation_lines_join_and_skip_comments() {
        let file =
            parse("FROM alpine\nRUN apk add \\\n# a comment\n\n    curl\nCOPY . /app\n").unwrap();
        let run = &file.instructions[1];
        assert_eq!(run.line, 2);
        assert_eq!(run.args, Args::Shell("apk add     curl".to_owned()));
        assert_eq!(file.instructions[2].line, 6);
    }

    #[test]
    fn the_escape_directive_changes_the_continuation_character() {
        let file =
            parse("# escape=`\nFROM mcr.microsoft.com/windows\nRUN dir `\n  c:\\\n").unwrap();
        assert_eq!(file.escape, '`');
        assert_eq!(
            file.instructions[1].args,
            Args::Shell("dir   c:\\".to_owned())
        );
    }

    #[test]
    fn directives_count_only_at_the_top() {
        let file = parse("FROM alpine\n# escape=`\nRUN a \\\n b\n").unwrap();
        assert_eq!(file.escape, '\\');
        assert_eq!(file.instructions.len(), 2);
        let err = parse("# escape=x\nFROM alpine\n").unwrap_err();
        assert_eq!(err.line, 1);
        let err = parse("# syntax=docker/dockerfile:1\n# syntax=x\nFROM a\n").unwrap_err();
        assert_eq!(err.line, 2);
    }

    #[test]
    fn heredocs_are_read_with_quoted_and_dash_delimiters() {
        let text = "FROM alpine\nRUN <<EOF\necho hi\nEOF\nCOPY <<-'A' /a <<\"B\" /b\n\tone\n\tA\ntwo\nB\nRUN cat <<<x\n";
        let file = parse(text).unwrap();
        let run = &file.instructions[1];
        assert_eq!(run.heredocs[0].body, "echo hi");
        let copy = &file.instructions[2];
        assert_eq!(copy.line, 5);
        assert_eq!(copy.heredocs.len(), 2);
        assert_eq!(copy.heredocs[0].body, "one");
        assert_eq!(copy.heredocs[1].body, "two");
        assert_eq!(file.instructions[3].line, 10);
        assert!(file.instructions[3].heredocs.is_empty());
    }

    #[test]
    fn an_unterminated_heredoc_is_an_error_at_its_instruction() {
        let err = parse("FROM alpine\n\nRUN <<EOF\necho hi\n").unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.message.contains("unterminated heredoc"));
    }

    #[test]
    fn json_and_shell_forms_and_flags() {
        let file = parse(
            "from --platform=$BUILDPLATFORM golang AS Build\ncopy --from=build --chown=1:1 [\"/a\", \"/b\"]\nrun [\"echo\", \"hi\"]\ncmd [not json\n",
        )
        .unwrap();
        assert_eq!(file.instructions[0].keyword, "FROM");
        assert_eq!(
            file.instructions[0].flag("platform"),
            Some("$BUILDPLATFORM")
        );
        assert_eq!(file.instructions[0].words(), vec!["golang", "AS", "Build"]);
        assert_eq!(file.instructions[1].flag("from"), Some("build"));
        assert_eq!(
            file.instructions[1].args,
            Args::Json(vec!["/a".to_owned(), "/b".to_owned()])
        );
        assert_eq!(
            file.instructions[3].args,
            Args::Shell("[not json".to_owned())
        );
    }

    #[test]
    fn bad_instructions_are_errors_with_their_line() {
        assert_eq!(parse("FROM a\n\nFORM b\n").unwrap_err().line, 3);
        assert_eq!(parse("RUN x\nFROM a\n").unwrap_err().line, 1);
        assert_eq!(parse("FROM\n").unwrap_err().line, 1);
        assert_eq!(parse("FROM a AS\n").unwrap_err().line, 1);
        assert!(parse("# just a comment\n").is_err());
        assert!(parse("ARG V=1\nFROM a:$V\n").is_ok());
    }
}
