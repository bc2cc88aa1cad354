"""Helpers shared by the test modules: a cluster under the supervisor (`cluster`), the
test cluster secret (`auth`), a stand-in shard (`fakeshard`) and processes started by hand
(`processes`)."""
