/*
 * A MySQL/MariaDB dialect for flink-connector-jdbc 4.0 (the recloop Flink job's behaviour log).
 *
 * Why recloop carries it: the connector's own MySQL dialect (flink-connector-jdbc-mysql) is
 * published on Maven Central only, which this project's machines cannot reach; PyPI's
 * connector bundle ships the core and the PostgreSQL dialect.  The statements follow the
 * connector's MySQL dialect: backquoted identifiers, upsert as INSERT ... ON DUPLICATE KEY
 * UPDATE.  Found by the connector through ServiceLoader (META-INF/services).
 */
package recloop.flink.jdbc.mysql;

import org.apache.flink.connector.jdbc.core.database.JdbcFactory;
import org.apache.flink.connector.jdbc.core.database.catalog.JdbcCatalog;
import org.apache.flink.connector.jdbc.core.database.dialect.JdbcDialect;

/** Accepts jdbc:mysql: and jdbc:mariadb: URLs (the MariaDB Connector/J driver takes both). */
public class MySqlFactory implements JdbcFactory {
    @Override
    public boolean acceptsURL(String url) {
        return url.startsWith("jdbc:mysql:") || url.startsWith("jdbc:mariadb:");
    }

    @Override
    public JdbcDialect createDialect() {
        return new MySqlDialect();
    }

    @Override
    public JdbcCatalog createCatalog(
            ClassLoader classLoader,
            String catalogName,
            String defaultDatabase,
            String username,
            String pwd,
            String baseUrl) {
        throw new UnsupportedOperationException("recloop's MySQL dialect has no JDBC catalog");
    }
}
