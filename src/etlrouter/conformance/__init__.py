"""The conformance kit: `etlrouter conformance ADDRESS` checks that a user service keeps the contract of the
kinds it serves (docs/conformance.md); `etlrouter verify` is the delivery oracle for a running cluster.

Pure parts: `model` (results, exit code, text, JUnit XML) and `judge` (what an answer means). I/O: `calls`
(the channel to the service), `checks` (the conversations), `runner`. `command` holds the click commands
and imports the rest only when one runs, so `etlrouter --help` stays fast.
"""
