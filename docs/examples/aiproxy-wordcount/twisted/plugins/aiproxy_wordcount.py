"""
The dropin: Twisted's plugin system finds C{word-count} here once the
package is installed.
"""

from aiproxy_wordcount import WordCountPlugin

word_count = WordCountPlugin()
