// Starts the Node reference Durable Streams server (@durable-streams/server) for benchmarks.
// The package ships no command-line entry; this wraps DurableStreamTestServer.
//   node reference-server.mjs --port P [--host H] [--data-dir D] [--long-poll-timeout MS]
// With --data-dir the server is file-backed (segment files + fdatasync per append, LMDB
// metadata); without it everything lives in memory. Prints "listening <url>" once bound and
// stops cleanly on SIGTERM/SIGINT.
//
// --max-file-handles N (default 1024): the file store keeps at most N segment files open
// (its own default is 100). With more streams appended concurrently than that, a handle can
// be evicted between write and fdatasync, and the append then fails with "handle not found",
// answered as 404 although the bytes were written (seen with 256 streams). The benchmark's
// append scenario uses 256 streams, so the reference gets enough handles to be judged on its
// speed rather than on that eviction race.
import { DurableStreamTestServer, FileBackedStreamStore } from "@durable-streams/server";

function parseArgs(argv) {
  const opts = { port: 4437, host: "127.0.0.1", maxFileHandles: 1024 };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i];
    const value = argv[i + 1];
    if (key === "--port") opts.port = Number(value);
    else if (key === "--host") opts.host = value;
    else if (key === "--data-dir") opts.dataDir = value;
    else if (key === "--long-poll-timeout") opts.longPollTimeout = Number(value);
    else if (key === "--max-file-handles") opts.maxFileHandles = Number(value);
    else {
      console.error(`unknown argument: ${key}`);
      process.exit(2);
    }
    i++;
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
const server = new DurableStreamTestServer({
  port: opts.port,
  host: opts.host,
  dataDir: opts.dataDir,
  longPollTimeout: opts.longPollTimeout,
});
if (opts.dataDir) {
  // DurableStreamTestServer builds its file store with default options; swap in one with
  // a larger handle pool before the server starts (same data dir, so close the first one).
  await server.store.close();
  server.store = new FileBackedStreamStore({
    dataDir: opts.dataDir,
    maxFileHandles: opts.maxFileHandles,
  });
}
const url = await server.start();
console.log(`listening ${url} mode=${opts.dataDir ? "file" : "memory"}`);

let stopping = false;
async function stop() {
  if (stopping) return;
  stopping = true;
  try {
    await server.stop();
  } finally {
    process.exit(0);
  }
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
