// A "null" GitHub Actions cache server (v2: twirp JSON + an Azure Blob subset; v1: the
// legacy REST API), so the benchmark can measure what @actions/cache itself reaches on this
// machine: the ceiling of any cache server's save and restore figures, per protocol.
//
//   node null-server.mjs --archive PATH
//
// Prints "null-server listening on http://127.0.0.1:PORT" once it listens.
//
// Why the ceiling is honest:
// * Save: CreateCacheEntry hands out a signed_upload_url on this server
//   (/acct/cont/<key>, path-style as the Azure SDK wants for an IP host). Put Blob and
//   Put Block read every byte and count it, then drop it; Put Block List answers 201;
//   FinalizeCacheEntryUpload answers ok. v1 likewise: reserve answers a cacheId, each
//   PATCH chunk is read, counted and dropped, commit answers 204. What remains of the
//   save is the client's own work (tar + zstdmt into RUNNER_TEMP, reading the archive
//   back, sending it over loopback: the SDK's 64 MiB blocks 8 at a time, or v1's 32 MiB
//   chunks 4 at a time) plus the cheapest possible receive. A real server must also store
//   the bytes, so no server can beat this.
// * Restore: GetCacheEntryDownloadURL (v1: the lookup's archiveLocation) hands out a URL
//   that streams the file at --archive. There the benchmark puts the very archive
//   layercache stored last (this round's, or the round before's where the ceiling goes
//   first; fetched from layercache, untimed), so the ceiling restores the same bytes
//   from the same disk, from the page cache as a
//   server that has just received them would: the client's download, unzstd and tar
//   extraction of a real archive, from a server that only copies a file to the socket.
//
// Every response carries x-ms-request-id, as the Azure SDK expects. GET /_null/stats
// answers the bytes received and served so far, so the benchmark can check that a save
// really uploaded its archive.

import { createServer } from 'node:http';
import { createReadStream, statSync } from 'node:fs';
import { randomUUID } from 'node:crypto';

const TWIRP = '/twirp/github.actions.results.api.v1.CacheService/';
const V1 = '/_apis/artifactcache/';
const BLOB_PREFIX = '/acct/cont/';

let archive = null;
for (let i = 2; i < process.argv.length; i++) {
  if (process.argv[i] === '--archive') archive = process.argv[++i];
}
if (!archive) {
  console.error('usage: node null-server.mjs --archive PATH');
  process.exit(64);
}

const stats = {
  uploaded_bytes: 0,
  served_bytes: 0,
  blocks: 0,
  blobs: 0,
  block_lists: 0,
  v1_chunks: 0,
  entries: 0,
};
let base = '';

function send(res, status, body, type = 'application/json') {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, {
    'content-type': type,
    'content-length': Buffer.byteLength(text),
    'x-ms-request-id': randomUUID(),
  });
  res.end(text);
}

function readText(req) {
  return new Promise((resolve, reject) => {
    const parts = [];
    req.on('data', (c) => parts.push(c));
    req.on('end', () => resolve(Buffer.concat(parts).toString('utf8')));
    req.on('error', reject);
  });
}

// Count the body's bytes and drop them.
function drain(req) {
  return new Promise((resolve, reject) => {
    let n = 0;
    req.on('data', (c) => {
      n += c.length;
    });
    req.on('end', () => resolve(n));
    req.on('error', reject);
  });
}

async function twirp(method, req, res) {
  let body;
  try {
    body = JSON.parse(await readText(req));
  } catch {
    return send(res, 400, { code: 'malformed', msg: 'body is not JSON' });
  }
  const key = String(body.key ?? '');
  const blobUrl = (sig) => `${base}${BLOB_PREFIX}${encodeURIComponent(key)}?sig=${sig}`;
  switch (method) {
    case 'CreateCacheEntry':
      return send(res, 200, { ok: true, signed_upload_url: blobUrl('upload') });
    case 'FinalizeCacheEntryUpload':
      stats.entries += 1;
      return send(res, 200, { ok: true, entry_id: String(stats.entries) });
    case 'GetCacheEntryDownloadURL':
      if (!archiveExists()) return send(res, 200, { ok: false });
      return send(res, 200, { ok: true, signed_download_url: blobUrl('download'), matched_key: key });
    default:
      return send(res, 404, { code: 'bad_route', msg: `no method ${method}` });
  }
}

function archiveExists() {
  try {
    statSync(archive);
    return true;
  } catch {
    return false;
  }
}

async function v1(url, req, res) {
  const resource = url.pathname.slice(V1.length);
  if (req.method === 'GET' && resource === 'cache') {
    if (!archiveExists()) {
      res.writeHead(204, { 'x-ms-request-id': randomUUID() });
      return res.end();
    }
    const key = (url.searchParams.get('keys') ?? '').split(',')[0];
    return send(res, 200, {
      cacheKey: key,
      scope: 'refs/heads/main',
      cacheVersion: url.searchParams.get('version'),
      creationTime: new Date().toISOString(),
      archiveLocation: `${base}${BLOB_PREFIX}${encodeURIComponent(key)}?sig=download`,
    });
  }
  if (req.method === 'POST' && resource === 'caches') {
    await readText(req);
    stats.entries += 1;
    return send(res, 201, { cacheId: stats.entries });
  }
  if (resource.startsWith('caches/')) {
    if (req.method === 'PATCH') {
      const n = await drain(req);
      stats.uploaded_bytes += n;
      stats.v1_chunks += 1;
      res.writeHead(204, { 'x-ms-request-id': randomUUID() });
      return res.end();
    }
    if (req.method === 'POST') {
      await readText(req);
      res.writeHead(204, { 'x-ms-request-id': randomUUID() });
      return res.end();
    }
  }
  return send(res, 404, { message: `no route ${req.method} ${url.pathname}` });
}

async function blob(url, req, res) {
  if (req.method === 'PUT') {
    const comp = url.searchParams.get('comp');
    if (comp === 'blocklist') {
      await readText(req);
      stats.block_lists += 1;
      return send(res, 201, '', 'text/plain');
    }
    const n = await drain(req);
    stats.uploaded_bytes += n;
    if (comp === 'block') stats.blocks += 1;
    else stats.blobs += 1;
    return send(res, 201, '', 'text/plain');
  }
  if (req.method === 'GET' || req.method === 'HEAD') {
    let size;
    try {
      size = statSync(archive).size;
    } catch {
      return send(res, 404, '<?xml version="1.0" encoding="utf-8"?><Error><Code>BlobNotFound</Code><Message>no archive</Message></Error>', 'application/xml');
    }
    res.writeHead(200, {
      'content-type': 'application/octet-stream',
      'content-length': size,
      'x-ms-request-id': randomUUID(),
    });
    if (req.method === 'HEAD') return res.end();
    const stream = createReadStream(archive, { highWaterMark: 1 << 20 });
    stream.on('data', (c) => {
      stats.served_bytes += c.length;
    });
    stream.on('error', () => res.destroy());
    return stream.pipe(res);
  }
  return send(res, 405, { code: 'bad_route', msg: `${req.method} not allowed` });
}

const server = createServer((req, res) => {
  const url = new URL(req.url, base || 'http://127.0.0.1');
  let done;
  if (req.method === 'POST' && url.pathname.startsWith(TWIRP)) {
    done = twirp(url.pathname.slice(TWIRP.length), req, res);
  } else if (url.pathname.startsWith(V1)) {
    done = v1(url, req, res);
  } else if (url.pathname.startsWith(BLOB_PREFIX)) {
    done = blob(url, req, res);
  } else if (req.method === 'GET' && url.pathname === '/_null/stats') {
    done = Promise.resolve(send(res, 200, stats));
  } else {
    done = Promise.resolve(send(res, 404, { code: 'bad_route', msg: `no route ${url.pathname}` }));
  }
  done.catch((err) => {
    console.error(err);
    res.destroy();
  });
});
server.requestTimeout = 0;
server.keepAliveTimeout = 60_000;
server.listen(0, '127.0.0.1', () => {
  base = `http://127.0.0.1:${server.address().port}`;
  console.log(`null-server listening on ${base}`);
});
for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(0));
