"""Every renderer of results: text, JSON, JUnit and SARIF for verify and check."""
