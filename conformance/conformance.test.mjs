// The official Durable Streams conformance suite, run against the server at DS_BASE_URL.
//
// The package's own CLI finds no tests when installed from npm (it looks for its test
// file in a source tree the package does not ship), so this file is the entry point:
// vitest collects the suite that runConformanceTests() declares.
//
//   DS_BASE_URL               server to test, e.g. http://127.0.0.1:4437 (required)
//   DS_LONG_POLL_TIMEOUT_MS   the server's long-poll timeout in ms (default 20000)
//   DS_SUBSCRIPTIONS=1        also run the opt-in subscription tests
//   DS_AUTH_TOKEN             send `Authorization: Bearer <token>` on every request (for a
//                             server with client auth on; the token must cover every path)
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.DS_BASE_URL
if (!baseUrl) {
  throw new Error("DS_BASE_URL must name the server under test, e.g. http://127.0.0.1:4437")
}

// The suite and its client call the global fetch at request time: wrapping it here adds the
// token to every request they make, unless a request sets Authorization itself.
const authToken = process.env.DS_AUTH_TOKEN
if (authToken) {
  const plainFetch = globalThis.fetch
  globalThis.fetch = (input, init = {}) => {
    const headers = new Headers(init.headers ?? (input instanceof Request ? input.headers : undefined))
    if (!headers.has("authorization")) headers.set("authorization", `Bearer ${authToken}`)
    return plainFetch(input, { ...init, headers })
  }
}

runConformanceTests({
  baseUrl: baseUrl.replace(/\/+$/, ""),
  longPollTimeoutMs: Number(process.env.DS_LONG_POLL_TIMEOUT_MS ?? 20000),
  subscriptions: process.env.DS_SUBSCRIPTIONS === "1",
})
