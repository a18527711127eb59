//! The signed URLs entries are uploaded to and downloaded from: the calls the Azure
//! Blob SDKs make on them (Put Blob, Put Block, Put Block List, Get Blob with or without
//! a range, Get Blob Properties). The path has Azure's `/<account>/<container>/<blob>`
//! shape, which the SDKs require of hosts given by address; every response carries
//! `x-ms-request-id`, which some clients cannot do without.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use quick_xml::events::Event;
use store::ByteRange;

use super::{ActionsError, UrlUse, entry_id, record};
use crate::app::AppState;
use crate::body::{byte_stream, drain_on_drop, parse_range};
use crate::sessions::Outcome;

/// The route of an entry's URL.
pub(super) const ROUTE: &str = "/layercache/actions/{entry}";
/// The Blob service version the answers follow.
const MS_VERSION: &str = "2024-11-04";
/// Largest block list accepted (50,000 ids of 64 characters fit).
const MAX_BLOCK_LIST: usize = 8 * 1024 * 1024;
/// Longest block id, decoded (Azure's limit).
const MAX_BLOCK_ID: usize = 64;

type Result<T = Response> = std::result::Result<T, ActionsError>;

/// The path of `entry`'s URL.
pub(super) fn path(entry: i64) -> String {
    ROUTE.replace("{entry}", &entry.to_string())
}

#[derive(Debug, Default, serde::Deserialize)]
struct Query {
    sig: Option<String>,
    comp: Option<String>,
    blockid: Option<String>,
}

/// Serve a request to an entry's URL.
pub(super) async fn dispatch(
    State(state): State<AppState>,
    Path(entry): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = drain_on_drop(body);
    let mut response = handle(&state, &entry, &parts, body)
        .await
        .unwrap_or_else(|e| super::refuse(&state, &parts, e, ActionsError::azure));
    let headers = response.headers_mut();
    let request_id = uuid::Uuid::new_v4().to_string();
    headers.insert(
        HeaderName::from_static("x-ms-request-id"),
        HeaderValue::from_str(&request_id).unwrap_or(HeaderValue::from_static("0")),
    );
    headers.insert(
        HeaderName::from_static("x-ms-version"),
        HeaderValue::from_static(MS_VERSION),
    );
    if let Some(id) = parts.headers.get("x-ms-client-request-id") {
        headers.insert(
            HeaderName::from_static("x-ms-client-request-id"),
            id.clone(),
        );
    }
    response
}

async fn handle(state: &AppState, entry: &str, parts: &Parts, body: Body) -> Result {
    let id = entry_id(entry)?;
    let query: Query = serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
        .map_err(|e| ActionsError::Invalid(format!("malformed query: {e}")))?;
    let verifier = &state.actions.verifier;
    match parts.method {
        Method::PUT => {
            verifier.check_url(query.sig.as_deref(), UrlUse::Upload, id)?;
            match query.comp.as_deref() {
                None => put_blob(state, id, parts, body).await,
                Some("block") => put_block(state, id, query.blockid, body).await,
                Some("blocklist") => put_block_list(state, id, body).await,
                Some(other) => Err(ActionsError::Invalid(format!("unsupported comp={other}"))),
            }
        }
        Method::GET | Method::HEAD => {
            let session = verifier.check_url(query.sig.as_deref(), UrlUse::Download, id)?;
            get_blob(state, id, parts, session).await
        }
        _ => Err(ActionsError::NoRoute(format!(
            "{} is not supported on an entry",
            parts.method
        ))),
    }
}

fn created() -> Result {
    Ok((
        StatusCode::CREATED,
        [
            (header::ETAG, "\"0x1\""),
            (
                header::HeaderName::from_static("x-ms-request-server-encrypted"),
                "false",
            ),
        ],
    )
        .into_response())
}

fn content_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Put Blob: the entry's whole content in one request.
async fn put_blob(state: &AppState, id: i64, parts: &Parts, body: Body) -> Result {
    let blob_type = parts
        .headers
        .get("x-ms-blob-type")
        .and_then(|v| v.to_str().ok());
    if blob_type != Some("BlockBlob") {
        return Err(ActionsError::Invalid(
            "x-ms-blob-type: BlockBlob is required".into(),
        ));
    }
    let limit = state.actions.max_entry_size();
    let declared = content_length(parts);
    if declared.is_some_and(|len| len > limit) {
        return Err(store::Error::EntryTooLarge { limit }.into());
    }
    state
        .store
        .put_entry_part(id, 0, declared, true, byte_stream(body), limit)
        .await?;
    created()
}

/// Put Block: one block, kept under its id until a block list places it.
async fn put_block(state: &AppState, id: i64, block: Option<String>, body: Body) -> Result {
    let block = block.ok_or_else(|| ActionsError::Invalid("blockid is required".into()))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&block)
        .map_err(|_| ActionsError::Invalid("blockid is not base64".into()))?;
    if decoded.is_empty() || decoded.len() > MAX_BLOCK_ID {
        return Err(ActionsError::Invalid(format!(
            "a block id has 1 to {MAX_BLOCK_ID} bytes"
        )));
    }
    let limit = state.actions.max_entry_size();
    state
        .store
        .put_entry_block(id, block, byte_stream(body), limit)
        .await?;
    created()
}

/// Put Block List: the entry's content is the named blocks, in the list's order.
async fn put_block_list(state: &AppState, id: i64, body: Body) -> Result {
    let bytes = axum::body::to_bytes(body, MAX_BLOCK_LIST)
        .await
        .map_err(|e| ActionsError::Malformed(format!("block list: {e}")))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ActionsError::Malformed("the block list is not UTF-8".into()))?;
    let blocks = block_list(text)?;
    state
        .store
        .assemble_entry(id, blocks, state.actions.max_entry_size())
        .await?;
    created()
}

/// The ids of a `<BlockList>`, in order (`Latest`, `Committed` and `Uncommitted` alike:
/// a block is staged until the entry is finished). An id is the whole text of its
/// element, however XML spells it: plain, in CDATA sections, with character or
/// predefined entity references. A list naming no block (`<BlockList/>`, what the Azure
/// SDKs send for an empty upload) is empty. Anything else in the document (another
/// root, unknown or nested elements, an empty id, a document type) is malformed.
pub(crate) fn block_list(xml: &str) -> Result<Vec<String>> {
    let malformed = |what: &str| ActionsError::Malformed(format!("block list: {what}"));
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut ids = Vec::new();
    // The elements open around the reader: `BlockList`, then an id's.
    let mut depth = 0usize;
    // The text of the id element being read.
    let mut id: Option<String> = None;
    let mut complete = false;
    loop {
        let event = reader.read_event().map_err(|e| malformed(&e.to_string()))?;
        match event {
            Event::Start(_) | Event::Empty(_) if complete => {
                return Err(malformed("content after </BlockList>"));
            }
            Event::Start(e) => {
                match (depth, e.name().as_ref()) {
                    (0, b"BlockList") => {}
                    (0, _) => return Err(malformed("the document's element is <BlockList>")),
                    (1, b"Latest" | b"Committed" | b"Uncommitted") => id = Some(String::new()),
                    (1, _) => {
                        return Err(malformed(
                            "<BlockList> holds <Latest>, <Committed> or <Uncommitted> ids",
                        ));
                    }
                    _ => return Err(malformed("a block id is text, without elements")),
                }
                depth += 1;
            }
            Event::Empty(e) => match (depth, e.name().as_ref()) {
                (0, b"BlockList") => complete = true,
                (1, b"Latest" | b"Committed" | b"Uncommitted") => {
                    return Err(malformed("a block id is empty"));
                }
                _ => return Err(malformed("unexpected empty element")),
            },
            Event::Text(text) => {
                let text = text.decode().map_err(|e| malformed(&e.to_string()))?;
                match id.as_mut() {
                    Some(id) => id.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err(malformed("text outside a block id")),
                }
            }
            Event::CData(data) => {
                let data = data.decode().map_err(|e| malformed(&e.to_string()))?;
                id.as_mut()
                    .ok_or_else(|| malformed("CDATA outside a block id"))?
                    .push_str(&data);
            }
            Event::GeneralRef(reference) => {
                let id = id
                    .as_mut()
                    .ok_or_else(|| malformed("a reference outside a block id"))?;
                let resolved = reference
                    .resolve_char_ref()
                    .map_err(|e| malformed(&e.to_string()))?;
                match resolved {
                    Some(char) => id.push(char),
                    None => {
                        let name = reference.decode().map_err(|e| malformed(&e.to_string()))?;
                        let text = quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| malformed(&format!("unknown entity &{name};")))?;
                        id.push_str(text);
                    }
                }
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                match (depth, id.take()) {
                    (0, _) => complete = true,
                    (_, Some(text)) => {
                        let text = text.trim();
                        if text.is_empty() {
                            return Err(malformed("a block id is empty"));
                        }
                        ids.push(text.to_owned());
                    }
                    (_, None) => {}
                }
            }
            Event::DocType(_) => {
                return Err(malformed("a block list takes no document type declaration"));
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) => {}
        }
    }
    if !complete {
        return Err(malformed("a complete <BlockList> element is required"));
    }
    Ok(ids)
}

/// Get Blob (whole or one range) and Get Blob Properties.
async fn get_blob(state: &AppState, id: i64, parts: &Parts, session: Option<String>) -> Result {
    let read = state.store.read_entry(id).await?;
    let size = read.size;
    let range_header = parts
        .headers
        .get("x-ms-range")
        .or_else(|| parts.headers.get(header::RANGE))
        .and_then(|v| v.to_str().ok());
    let range = match range_header {
        Some(value) => parse_range(value, size).map_err(|()| {
            ActionsError::RangeNotSatisfiable(format!("range {value:?} is not satisfiable"))
        })?,
        None => None,
    };
    let scope = read.entry.scope.clone();
    let len = range.map_or(size, |r| r.len);
    let mut response = if parts.method == Method::HEAD {
        Response::new(Body::empty())
    } else {
        record(
            state,
            crate::sessions::remote_addr(&parts.extensions),
            session.as_deref(),
            &scope,
            Outcome::EntryServed { bytes: len },
        );
        Response::new(Body::from_stream(read.stream(range)))
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::ETAG, HeaderValue::from_static("\"0x1\""));
    headers.insert(
        HeaderName::from_static("x-ms-blob-type"),
        HeaderValue::from_static("BlockBlob"),
    );
    if let Some(ByteRange { start, len }) = range {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let value = format!("bytes {start}-{}/{size}", start + len - 1);
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(header::CONTENT_RANGE, value);
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_list_keeps_its_order() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><BlockList><Latest>b</Latest><Latest>a</Latest><Uncommitted>c</Uncommitted></BlockList>"#;
        assert_eq!(block_list(xml).unwrap(), ["b", "a", "c"]);
        for bad in [
            "not xml <",
            "<Other/>",
            "<BlockList><Latest>b</Latest>",
            "<BlockList><Latest>",
            r#"<!DOCTYPE BlockList [<!ENTITY x "b">]><BlockList><Latest>&x;</Latest></BlockList>"#,
        ] {
            assert!(block_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_block_id_is_the_whole_text_of_its_element() {
        let xml = "<BlockList>\n <Latest><![CDATA[QUJD]]></Latest>\n \
                   <Committed> Q<![CDATA[UJ]]>E </Committed>\n \
                   <Uncommitted>&#x51;UJ&#71;</Uncommitted><Latest>a&amp;b</Latest></BlockList>";
        assert_eq!(block_list(xml).unwrap(), ["QUJD", "QUJE", "QUJG", "a&b"]);
    }

    #[test]
    fn a_list_naming_no_block_is_empty() {
        for xml in [
            r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><BlockList/>"#,
            "<?xml version=\"1.0\"?>\n<BlockList>\n</BlockList>\n",
            "<!-- nothing --><BlockList></BlockList>",
        ] {
            assert_eq!(block_list(xml).unwrap(), Vec::<String>::new(), "{xml}");
        }
    }

    #[test]
    fn anything_but_ids_in_a_block_list_is_malformed() {
        for bad in [
            "",
            "<BlockList><Latest/></BlockList>",
            "<BlockList><Latest></Latest></BlockList>",
            "<BlockList><Latest> <![CDATA[ ]]> </Latest></BlockList>",
            "<BlockList><Latest><Latest>x</Latest></Latest></BlockList>",
            "<BlockList><Latest>&unknown;</Latest></BlockList>",
            "<BlockList><Latest>&#0;</Latest></BlockList>",
            "<BlockList><Other>x</Other></BlockList>",
            "<BlockList><Other/></BlockList>",
            "<BlockList>x</BlockList>",
            "<BlockList><![CDATA[x]]></BlockList>",
            "<BlockList>&amp;</BlockList>",
            "<BlockList></BlockList><BlockList></BlockList>",
            "<BlockList/><Latest>x</Latest>",
            "<Latest>x</Latest>",
            "<BlockList><Latest>x</Committed></BlockList>",
        ] {
            assert!(
                matches!(block_list(bad), Err(ActionsError::Malformed(_))),
                "{bad}"
            );
        }
    }
}
