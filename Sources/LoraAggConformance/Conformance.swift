/// The conformance suite.
