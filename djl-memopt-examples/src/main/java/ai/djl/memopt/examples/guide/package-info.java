/**
 * The Java snippets of {@code docs/user-guide.md}, each a class whose imports and one method the guide shows verbatim
 * (between {@code // guide:begin} and {@code // guide:end}): they compile with the project, run in
 * {@code GuideSnippetsTest}, and {@code GuideDocsTest} fails when the guide and these sources differ (run it with
 * {@code -Dmemopt.updateDocs=true} to rewrite the guide's blocks from the sources).
 */
package ai.djl.memopt.examples.guide;
