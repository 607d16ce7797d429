"""Integrations with other libraries. Each submodule imports its library itself, so `import hybridrag` (and this
package) never imports them: `hybridrag.integrations.transformers` needs `transformers`."""
