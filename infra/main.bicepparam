// Parameters of main.bicep for azd (azure.yaml): each from the azd environment (`azd env set NAME
// value`), else the value infra/main.parameters.json gives it. infra/deploy.sh reads
// main.parameters.json; tests/test_azd.py checks that both files set the same parameters to the
// same defaults. Lists are comma-separated, hveLimits is JSON.
using './main.bicep'

param environmentName = readEnvironmentVariable('AZURE_ENV_NAME', 'hve-relay')
param hveAccounts = split(readEnvironmentVariable('HVE_ACCOUNTS', 'hve-notify@contoso.onmicrosoft.com,hve-welcome@contoso.onmicrosoft.com'), ',')
param hveInternalDomains = split(readEnvironmentVariable('HVE_INTERNAL_DOMAINS', 'contoso.com,contoso.onmicrosoft.com'), ',')
param hveAuth = readEnvironmentVariable('HVE_AUTH', 'basic')
param hveSenderName = readEnvironmentVariable('HVE_SENDER_NAME', 'Contoso')
param hveLimitsProfile = readEnvironmentVariable('HVE_LIMITS_PROFILE', 'ga-2026')
param hveLimits = json(readEnvironmentVariable('HVE_LIMITS', '{}'))
param hveDailyRecipientBudget = int(readEnvironmentVariable('HVE_DAILY_RECIPIENT_BUDGET', '0'))
param welcomeEnabled = bool(readEnvironmentVariable('WELCOME_ENABLED', 'false'))
param welcomeSchedule = readEnvironmentVariable('WELCOME_SCHEDULE', '0 */15 * * * *')
param welcomeLookback = readEnvironmentVariable('WELCOME_LOOKBACK', 'P7D')
param welcomeGroupId = readEnvironmentVariable('WELCOME_GROUP_ID', '')
param welcomeBcc = readEnvironmentVariable('WELCOME_BCC', '')
param welcomeSupportAddress = readEnvironmentVariable('WELCOME_SUPPORT_ADDRESS', '')
param welcomeFaqUrl = readEnvironmentVariable('WELCOME_FAQ_URL', '')
param grantGraphUserReadAll = bool(readEnvironmentVariable('GRANT_GRAPH_USER_READ_ALL', 'false'))
param grantExchangeMailSend = bool(readEnvironmentVariable('GRANT_EXCHANGE_MAIL_SEND', 'false'))
// azd sets AZURE_PRINCIPAL_ID to the signed-in principal: it gets the roles the postprovision hook
// needs (Key Vault Secrets Officer). A service principal: azd env set AZURE_PRINCIPAL_TYPE ServicePrincipal.
param deployerPrincipalId = readEnvironmentVariable('AZURE_PRINCIPAL_ID', '')
param deployerPrincipalType = readEnvironmentVariable('AZURE_PRINCIPAL_TYPE', 'User')
param enableAlerts = bool(readEnvironmentVariable('ENABLE_ALERTS', 'false'))
param alertEmail = readEnvironmentVariable('ALERT_EMAIL', '')
param producers = json(readEnvironmentVariable('HVE_PRODUCERS', '[]'))
param producerPrincipalIds = json(readEnvironmentVariable('HVE_PRODUCER_PRINCIPAL_IDS', '[]'))
