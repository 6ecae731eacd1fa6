"""`transmiter upgrade`: an export moved onto a new target, judged against the old one (docs/upgrade.md)."""
