// A small command line over @actions/cache, for the end-to-end tests in
// tests/actions_client.rs. Run it with the working directory set to
// GITHUB_WORKSPACE and the runner's environment (ACTIONS_CACHE_URL or
// ACTIONS_RESULTS_URL + ACTIONS_CACHE_SERVICE_V2, ACTIONS_RUNTIME_TOKEN,
// RUNNER_TEMP, GITHUB_WORKSPACE).
//
//   node cache.mjs save <key> <path>...
//       saveCache(paths, key); prints {"result": <cache id, or -1>}
//   node cache.mjs restore <primaryKey> <restoreKeys,comma,separated|-> <path>...
//       restoreCache(paths, primaryKey, restoreKeys); prints {"result": <matched key, or null>}
//
// The library's log (info, ::debug::, ::warning::, ::error:: lines from
// @actions/core) goes to stdout as it would on a runner; the result is the
// last line. A thrown error (e.g. a validation error) exits with status 1.

import * as cache from '@actions/cache';

const usage =
  'usage: node cache.mjs save <key> <path>...\n' +
  '       node cache.mjs restore <primaryKey> <restoreKeys,comma,separated|-> <path>...';

async function main(argv) {
  const [command, ...args] = argv;
  switch (command) {
    case 'save': {
      const [key, ...paths] = args;
      if (key === undefined || paths.length === 0) throw new Error(usage);
      return await cache.saveCache(paths, key);
    }
    case 'restore': {
      const [primaryKey, restoreKeys, ...paths] = args;
      if (primaryKey === undefined || restoreKeys === undefined || paths.length === 0) {
        throw new Error(usage);
      }
      const keys = restoreKeys === '-' ? [] : restoreKeys.split(',');
      const matched = await cache.restoreCache(paths, primaryKey, keys);
      return matched ?? null;
    }
    default:
      throw new Error(usage);
  }
}

try {
  const result = await main(process.argv.slice(2));
  process.stdout.write(`${JSON.stringify({ result })}\n`);
} catch (error) {
  process.stderr.write(`cache.mjs: ${error?.stack ?? error}\n`);
  process.exitCode = 1;
}
