// A small command line over @azure/storage-blob (the Azure SDK @actions/cache
// uploads with), for the end-to-end tests in tests/actions_protocol.rs.
//
//   node azure-blob.mjs upload-stream <signed-url> < content
//       BlockBlobClient.uploadStream of stdin: Put Block for each piece, then
//       Put Block List, even when stdin is empty (an empty list); prints
//       {"result": <the answer's request id>}
//
// A failed request exits with status 1 and the SDK's error on stderr.

import { BlockBlobClient } from '@azure/storage-blob';

const usage = 'usage: node azure-blob.mjs upload-stream <signed-url> < content';

async function main(argv) {
  const [command, url] = argv;
  if (command !== 'upload-stream' || url === undefined) throw new Error(usage);
  const client = new BlockBlobClient(url);
  const answer = await client.uploadStream(process.stdin, 64 * 1024, 2);
  return answer.requestId ?? null;
}

try {
  const result = await main(process.argv.slice(2));
  process.stdout.write(`${JSON.stringify({ result })}\n`);
} catch (error) {
  process.stderr.write(`azure-blob.mjs: ${error?.stack ?? error}\n`);
  process.exitCode = 1;
}
